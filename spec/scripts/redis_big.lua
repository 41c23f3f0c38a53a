-- redis_big.lua: a scope of big values, for the Redis change-log bound (spec/test_redis.py).
local mp = require("metaparticle")

-- Counts, and rewrites a value of `size` bytes: every commit logs one big record.
mp.service("bump", function(size)
  local g = mp.scope.global
  g.n = (g.n or 0) + 1
  g.blob = string.rep(string.char(97 + g.n % 26), size)
  return g.n
end).expose = true

mp.serve()
