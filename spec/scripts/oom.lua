-- oom.lua: Lua allocations fail on demand (MPH_TEST_LUA_ALLOC_FAIL=1; spec/test_scope.py).
-- "incr" arms the failure, then runs a write transaction whose every stage allocates: the
-- handler, encoding, merging, the commit's write set, folding the commit into the scope.
local mp = require("metaparticle")

local function expose(name, fn) mp.service(name, fn).expose = true end

expose("incr", function(skip, count)
  mp.test_fail_allocations(skip, count)
  local g = mp.scope.global
  local n = (g.n or 0) + 1
  g.n = n
  local hist = g.hist or mp.array()
  hist[#hist + 1] = {n = n, s = "call " .. n}
  if #hist > 3 then table.remove(hist, 1) end -- the same work every call
  g.hist = hist
  return {n = n}
end)
expose("disarm", function() mp.test_fail_allocations(0, 0) return true end)
expose("get", function() local g = mp.scope.global return {n = g.n, hist = g.hist} end)
mp.serve()
