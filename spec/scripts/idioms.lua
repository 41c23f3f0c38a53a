-- idioms.lua: every way a handler changes scope data (spec/test_scope.py). Each step is one
-- call, so each is one transaction that must be found and committed.
local mp = require("metaparticle")

local steps = {}

steps.set_scalar = function(g) g.a = 1 g.s = "text" g.f = false end
steps.nested_table = function(g) g.t = {x = {y = 1}, keep = "k"} end
steps.deep_assign = function(g) g.t.x.y = 2 end
steps.read_then_assign = function(g)
  local t = g.t          -- t.a read earlier ...
  local x = t.x
  x.z = 3                -- ... then t.a.b = v
end
steps.new_list = function(g) g.list = mp.array() end
steps.insert = function(g)
  table.insert(g.list, "c")
  table.insert(g.list, "a")
  table.insert(g.list, 1, "b")
end
steps.sort = function(g) table.sort(g.list) end
steps.remove = function(g) table.remove(g.list, 1) end
steps.append_len = function(g) local l = g.list l[#l + 1] = "d" end
steps.reassign_mutated = function(g)
  local l = g.list2 or {}
  l[#l + 1] = 9
  g.list2 = l            -- looks like a no-op assignment of the same table
end
steps.delete_key = function(g) g.a = nil end
steps.delete_nested = function(g) g.t.keep = nil end
steps.replace_subtree = function(g) g.r = {old = 1} end
steps.replace_subtree2 = function(g) g.r = {new = 2} end
steps.same_value = function(g) g.s = "text" g.t.x.y = g.t.x.y end
steps.nested_insert_in_object = function(g)
  g.obj = g.obj or {}
  g.obj.items = g.obj.items or mp.array()
  table.insert(g.obj.items, {n = #g.obj.items + 1})
end
steps.empty_containers = function(g) g.ea = mp.array() g.eo = {} end
steps.null_value = function(g) g.n = mp.null end

local svc = mp.service("step", function(name)
  local f = steps[name]
  if not f then error("no step " .. tostring(name)) end
  f(mp.scope.global)
  return true
end)
svc.expose = true

mp.service("dump", function() return mp.scope.global end).expose = true

mp.service("reads", function()
  local g = mp.scope.global
  local keys = {}
  for k in pairs(g) do keys[#keys + 1] = k end
  table.sort(keys)
  local n = 0
  local k = next(g)
  while k ~= nil do n = n + 1 k = next(g, k) end
  local items = {}
  for i, v in ipairs(g.list) do items[i] = v end
  return {keys = keys, next_count = n, len = #g.list, concat = table.concat(g.list, ","),
          unpacked = mp.array({unpack(g.list)}), ipairs = items, type = type(g),
          root_len = #g}
end).expose = true

mp.service("fail_after_write", function()
  local g = mp.scope.global
  g.a = "should not be committed"
  g.t.x.y = -1
  error("fails after writing")
end).expose = true

mp.service("bad_key", function() mp.scope.global[1] = "x" return true end).expose = true
mp.service("insert_root", function() table.insert(mp.scope.global, "x") return true end).expose = true
mp.service("store_function", function() mp.scope.global.fn = {f = print} return true end).expose = true

local kept
mp.service("keep_root", function() kept = mp.scope.global return true end).expose = true
mp.service("use_kept", function() kept.x = 1 return true end).expose = true

mp.service("big", function(key, size, tag)
  mp.scope.global[key] = (tag or "") .. string.rep("x", size)
  return true
end).expose = true

mp.service("get", function(key) return mp.scope.global[key] end).expose = true
mp.service("set", function(key, value) mp.scope.global[key] = value return true end).expose = true
mp.service("del", function(key) mp.scope.global[key] = nil return true end).expose = true
mp.service("keys", function()
  local keys = {}
  for k in pairs(mp.scope.global) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end).expose = true

mp.serve()
