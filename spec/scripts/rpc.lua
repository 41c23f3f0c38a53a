-- rpc.lua: services for the JSON-RPC and Lua API tests (spec/test_rpc.py).
local mp = require("metaparticle")

local function expose(name, fn)
  mp.service(name, fn).expose = true
end

-- The examples of the JSON-RPC 2.0 specification.
expose("subtract", function(a, b)
  if type(a) == "table" then return a.minuend - a.subtrahend end
  return a - b
end)
expose("update", function() end)
expose("notify_hello", function() end)
expose("notify_sum", function() end)
expose("sum", function(...)
  local s = 0
  for _, v in ipairs({...}) do s = s + v end
  return s
end)
expose("get_data", function() return mp.array({"hello", 5}) end)

-- The mapping and the Lua API.
expose("echo", function(v) return v end)
expose("args", function(...) return select("#", ...) end)
expose("raise", function(msg) error(msg) end)
expose("raise_table", function() error({}) end)
expose("raise_obj", function() mp.error(-32050, "custom failure", {why = "because"}) end)
expose("bad_result", function() return {ok = 1, f = function() end} end)
expose("nan", function() return {x = 0 / 0} end)
expose("inf", function() return math.huge end)
expose("mixed", function() return {1, 2, x = 3} end)
expose("sparse", function() return {[1] = 1, [3] = 3} end)
expose("cycle", function() local t = {} t.self = t return t end)
expose("null", function() return {a = mp.null} end)
expose("empty_array", function() return mp.array() end)
expose("empty_object", function() return {} end)
expose("object_marked", function() return mp.object({[1] = "one"}) end)
expose("numbers", function() return {0.1, 1e300, -0.5, 2 ^ 53, 1 / 3, 2.0, -0.0} end)
expose("bad_utf8", function() return "\255\254" end)
expose("sibling", function() return require("sibling").value end)
expose("yield", function() coroutine.yield() end)
expose("inner_coroutine", function()
  local co = coroutine.wrap(function(a) local b = coroutine.yield(a + 1) return b * 2 end)
  local first = co(1)
  return {first, co(10)}
end)
expose("log", function()
  mp.log("hello from lua", 42)
  mp.log.warn("a warning")
  return true
end)
local ok, outside = pcall(function() return mp.scope.global end)
expose("outside_error", function() return {ok = ok, message = tostring(outside)} end)
expose("types", function(v) return type(v) end)
-- mp.error and error objects (issue #7).
expose("mp_error", function(code, message, data) mp.error(code, message, data) end)
expose("big_error_data", function(n) mp.error(-32050, "big", string.rep("x", n)) end)
expose("forged_error", function(code)
  local _, e = pcall(mp.error, -32050, "real")
  error(setmetatable({code = code, message = "forged"}, getmetatable(e)))
end)
expose("nested_error", function()
  local _, inner = pcall(mp.error, -32051, "inner", {n = 1})
  mp.error(-32050, "outer", inner)
end)
expose("rethrown_error", function()
  local _, e = pcall(mp.error, -32052, "again")
  error(e)
end)
-- Number keys under mp.object, as the encoder writes numbers.
expose("number_keys", function()
  return mp.object({[1e300] = "a", [2 ^ 53] = "b", [1] = "c", [1.7976931348623157e308] = "d"})
end)
expose("duplicate_keys", function() return {x = mp.object({[1] = "a", ["1"] = "b"})} end)
expose("deep_result", function(n)
  local t = {}
  for _ = 1, n do t = {t} end
  return t
end)
expose("scope_cycle", function()
  local g = mp.scope.global
  g.me = g
end)
expose("scope_self_table", function()
  local t = {}
  t.self = t
  mp.scope.global.t = t
end)
-- A table whose metatable claims a plain form that is another such table, without end.
expose("endless_plain", function()
  local mt = {}
  mt.__mp_plain = function() return setmetatable({}, mt) end
  return setmetatable({}, mt)
end)
mp.service("hidden", function() return "secret" end) -- not exposed

mp.serve()
