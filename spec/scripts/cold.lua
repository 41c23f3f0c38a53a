-- cold.lua: handlers whose first touch of a scope is inside a callback that C calls or in a
-- coroutine they made (spec/test_scope.py, spec/test_redis.py). On a warm process these
-- work; they must work as well when the scope is not loaded yet.
local mp = require("metaparticle")

local function expose(name, fn) mp.service(name, fn).expose = true end

local function bump()
  local g = mp.scope.global
  g.n = (g.n or 0) + 1
  return g.n
end

expose("in_sort", function()
  local n
  local list = {3, 1, 2}
  table.sort(list, function(a, b)
    n = n or bump()
    return a < b
  end)
  return n
end)
expose("in_gsub", function()
  local n
  local _ = ("x"):gsub("x", function() n = bump() end)
  return n
end)
expose("in_tostring", function()
  return tonumber(tostring(setmetatable({}, {__tostring = function() return bump() end})))
end)
expose("in_coroutine", function() return coroutine.wrap(bump)() end)
expose("in_sort_caught", function() -- the handler swallows whatever the comparator raised
  local n
  pcall(table.sort, {2, 1}, function(a, b) n = n or bump() return a < b end)
  return n
end)
expose("read_in_sort", function()
  local n
  table.sort({2, 1}, function(a, b) n = mp.scope.global.n return a < b end)
  return n
end)
expose("big", function(k, n) mp.scope.global[k] = string.rep("x", n) return true end)
expose("get", function() return mp.scope.global.n end)
mp.serve()
