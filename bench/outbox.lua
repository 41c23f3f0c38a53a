-- outbox.lua: bench/outbox.sh's service. "seed(n, at)" sends n messages to mp.self's "work",
-- all due at `at` (Unix seconds), in one call; "work" counts itself in the global scope, and
-- "done" reads the count.
local mp = require("metaparticle")

mp.service("seed", function(n, at)
  for i = 1, n do mp.send(mp.self, "work", { i }, { at = at }) end
  return n
end).expose = true

mp.service("work", function()
  local g = mp.scope.global
  g.done = (g.done or 0) + 1
end)

mp.service("done", function()
  return mp.scope.global.done or 0
end).expose = true

mp.serve()
