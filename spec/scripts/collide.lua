-- collide.lua: a handler that always meets a conflict (spec/test_scope.py). Before it
-- returns, each run appends the next of a series of records, prepared by the test, to the
-- scope's log, as another process committing first would; so every commit of the call's own
-- writes is refused, until --max-retries gives up with -32001.
local mp = require("metaparticle")

local runs = 0

mp.service("collide", function(log, records)
  runs = runs + 1
  mp.scope.global.mine = runs -- the call's own write, never to be committed
  local rf = io.open(records .. "/" .. runs, "rb")
  if rf then
    local data = rf:read("*a")
    rf:close()
    local f = assert(io.open(log, "ab"))
    f:write(data)
    f:close()
  end
  return runs
end).expose = true

mp.service("runs", function() return runs end).expose = true
mp.service("get", function(key) return mp.scope.global[key] end).expose = true

mp.serve()
