-- idem.lua: services for spec/test_idempotency.py. `incr` counts its runs in storage (a replay
-- must not move the count); `runs` reports how often each handler ran in this process
-- (handlers that raise commit nothing, so their runs are counted here).
local mp = require("metaparticle")

local runs = {}
local function ran(what)
  runs[what] = (runs[what] or 0) + 1
  return runs[what]
end

mp.service("incr", function(p)
  ran("incr")
  local g = mp.scope.global
  g.n = (g.n or 0) + 1
  return { n = g.n, params = p }
end).expose = true

mp.service("count", function()
  return mp.scope.global.n or 0
end).expose = true

-- Writes to a named scope (its name from params) and counts there.
mp.service("deposit", function(p)
  ran("deposit")
  local a = mp.scope.named("account:" .. p.id)
  a.balance = (a.balance or 0) + p.amount
  return { id = p.id, balance = a.balance }
end).expose = true

mp.service("balance", function(p)
  return mp.scope.named("account:" .. p.id).balance or 0
end).expose = true

-- Raises an error of its own after writing (the write is never committed).
mp.service("boom", function()
  local k = ran("boom")
  mp.scope.global.boomed = k
  mp.error(4001, "boom " .. k, { attempt = k })
end).expose = true

-- Raises a transient error the first time it runs in a process, then answers.
mp.service("flaky", function()
  local k = ran("flaky")
  if k == 1 then mp.error(-32002, "storage unavailable: not this time") end
  mp.scope.global.flaky = k
  return k
end).expose = true

-- Touches no scope at all.
mp.service("pure", function(x)
  return { pure = ran("pure"), x = x }
end).expose = true

mp.service("mine", mp.basicAuth(function()
  ran("mine")
  local u = mp.scope.user
  u.n = (u.n or 0) + 1
  return { user = mp.user, n = u.n }
end)).expose = true

mp.service("peek", function(k)
  return mp.scope.global[k]
end).expose = true

mp.service("runs", function(what)
  return runs[what] or 0
end).expose = true
-- Tries to reach an idempotency record's bucket by its name (it cannot: named scopes are
-- stored as "n:" .. name).
mp.service("tamper", function(p)
  local s = mp.scope.named(p.scope)
  s[p.key] = { e = 0 }
  return true
end).expose = true

mp.serve()
