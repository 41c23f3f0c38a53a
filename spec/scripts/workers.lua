-- workers.lua: the worker topology seen from inside (spec/test_workers.py).
local mp = require("metaparticle")

local at_load = { id = mp.worker.id, count = mp.worker.count, pid = mp.worker.pid }

-- A worker started after FLAG_FILE appears cannot load: a broken script on a replacement.
local flag = os.getenv("MPH_TEST_BROKEN_FLAG")
if flag and io.open(flag) then
  error("refusing to load: " .. flag .. " exists")
end
-- Only worker REFUSE_ID fails to load (the supervisor's own load of the script passes).
if tonumber(os.getenv("MPH_TEST_REFUSE_ID") or "") == mp.worker.id then
  error("worker " .. mp.worker.id .. " refuses to load")
end

-- mp.spread(MPH_TEST_SPREAD or 1, ...): 1 asks for no workers (--workers decides).
local spread = tonumber(os.getenv("MPH_TEST_SPREAD") or "1")
mp.service("whoami", mp.spread(spread, function()
  return { id = mp.worker.id, count = mp.worker.count, pid = mp.worker.pid, at_load = at_load }
end)).expose = true

-- Runs for `seconds` of CPU time after creating file `started` (so the test knows this
-- worker is busy): a worker stuck in a handler.
mp.service("spin", function(started, seconds)
  local f = assert(io.open(started, "w"))
  f:close()
  local t = os.clock()
  while os.clock() - t < seconds do end
  return mp.worker.id
end).expose = true

mp.service("exit", function(code) os.exit(code) end).expose = true

-- The handler time limit with the compiler on. "forever" is a loop LuaJIT compiles, which no
-- hook can stop: only the supervisor's heartbeat check ends it, with its worker. "interp" is
-- the same loop kept from the compiler, which the time limit's hook stops (-32003).
local function touch(path)
  local f = assert(io.open(path, "w"))
  f:close()
end
mp.service("forever", function(started)
  touch(started)
  while true do end
end).expose = true
local function interpreted_loop()
  local i = 0
  while true do i = i + 1 end
end
jit.off(interpreted_loop)
mp.service("interp", function(started)
  touch(started)
  interpreted_loop()
end).expose = true
mp.service("jit", function() return jit.status() end).expose = true

mp.serve()
