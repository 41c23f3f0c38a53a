-- waits_at_load.lua: a script slow to start on purpose (spec/test_cli.py, a delete racing a
-- deploy): it creates the file $MPH_TEST_LOADING, then waits for $MPH_TEST_GO to exist.
local mp = require("metaparticle")

local function exists(path)
  local f = io.open(path)
  if f then f:close() end
  return f ~= nil
end

io.open(os.getenv("MPH_TEST_LOADING"), "w"):close()
while not exists(os.getenv("MPH_TEST_GO")) do
  os.execute("sleep 0.01")
end
mp.service("ping", function() return "pong" end).expose = true
mp.serve()
