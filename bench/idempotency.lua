-- idempotency.lua: the services bench/idempotency.sh measures: a counter in the global scope
-- (incr), and deposits into one of many named scopes (deposit), called with or without an
-- Idempotency-Key (bench/rpc.lua, KEYED=1).
local mp = require("metaparticle")

mp.service("incr", function()
  local g = mp.scope.global
  g.n = (g.n or 0) + 1
  return g.n
end).expose = true

mp.service("deposit", function(p)
  local a = mp.scope.named("account:" .. p.id)
  a.balance = (a.balance or 0) + 1
  return a.balance
end).expose = true

mp.serve()
