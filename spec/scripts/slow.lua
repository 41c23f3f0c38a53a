-- slow.lua: handlers that run too long (spec/test_rpc.py, the -32003 tests). Their loops are
-- kept from LuaJIT's compiler (jit.off), where the time limit's hook can stop them: compiled
-- code runs no hooks (spec/test_workers.py has what happens to a compiled one).
local mp = require("metaparticle")

local function spin()
  local i = 0
  while true do i = i + 1 end
end
jit.off(spin)
local function fill()
  local t = {}
  for k = 1, 1e15 do t[k % 64] = k end
end
jit.off(fill)

mp.service("spin", spin).expose = true
mp.service("spin_table", function() fill() end).expose = true
mp.service("writes_then_spins", function()
  mp.scope.global.x = "must not be committed"
  spin()
end).expose = true
mp.service("catches_then_writes", function()
  local ok, err = pcall(spin)      -- swallows the timeout ...
  mp.scope.global.y = "must not be committed either"
  return {ok = ok, err = tostring(err)}  -- ... but cannot get past the checkpoint
end).expose = true
mp.service("read", function() return mp.scope.global end).expose = true
mp.service("jit", function() return jit.status() end).expose = true
mp.serve()
