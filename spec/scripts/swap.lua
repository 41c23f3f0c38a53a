-- swap.lua: compare-and-swap on a counter, for the test of a lock kept after a conflict
-- (spec/test_scope.py): a re-run that finds the counter changed raises, so the conflict that
-- caused it is followed by no commit.
local mp = require("metaparticle")

mp.service("swap", function(from, to)
  local g = mp.scope.global
  if (g.n or 0) ~= from then
    error("n is " .. tostring(g.n or 0) .. ", not " .. tostring(from))
  end
  g.n = to
  return to
end).expose = true

mp.service("get", function()
  return mp.scope.global.n or 0
end).expose = true

mp.serve()
