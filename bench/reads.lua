-- reads.lua: the service bench/reads.sh measures: one counter in the global scope, read
-- strictly (get: checked against storage) or from the worker's snapshot (get_cached), and
-- written (incr), on as many workers as --workers says.
local mp = require("metaparticle")

mp.service("incr", function()
  local g = mp.scope.global
  g.n = (g.n or 0) + 1
  return g.n
end).expose = true

mp.service("get", function() return mp.scope.global.n end).expose = true

local cached = mp.service("get_cached", function() return mp.scope.global.n end)
cached.expose = true
cached.reads = "cached"

mp.serve()
