-- Named scopes: accounts moved between in transactions that span two scopes, and an auditor
-- that reads many in one call (spec/test_named.py).
local mp = require("metaparticle")

local function expose(name, fn)
  mp.service(name, fn).expose = true
end

local function account(id)
  return mp.scope.named("account:" .. id)
end

expose("deposit", function(p)
  local a = account(p.id)
  a.balance = (a.balance or 0) + p.amount
  return a.balance
end)

-- Refuses to overdraw: no balance ever goes negative.
expose("transfer", function(p)
  local from, to = account(p.from), account(p.to)
  local have = from.balance or 0
  if have < p.amount then mp.error(-32010, "insufficient funds") end
  from.balance = have - p.amount
  to.balance = (to.balance or 0) + p.amount
  return true
end)

-- Every balance of accounts 1..n, read in one call.
expose("audit", function(p)
  local total, low = 0, nil
  for i = 1, p.n do
    local b = account(i).balance or 0
    total = total + b
    if low == nil or b < low then low = b end
  end
  return {total = total, low = low}
end)

expose("count", function(p)
  local s = mp.scope.named(p.name)
  s.n = (s.n or 0) + 1
  return s.n
end)

expose("read", function(p)
  return mp.scope.named(p.name).n or 0
end)

-- Touches a named scope with whatever name it is given (errors are the point).
expose("touch", function(name)
  local s = mp.scope.named(name)
  return s.n or 0
end)

-- Counts in a named scope and in the global one in one call.
expose("both", function(p)
  local s, g = mp.scope.named(p.name), mp.scope.global
  s.n = (s.n or 0) + 1
  g.n = (g.n or 0) + 1
  return {named = s.n, global = g.n}
end)

-- The same through mp.scoped(name, fn), the original's form.
expose("both-scoped", function(p)
  local named = mp.scoped(p.name, function(s) s.n = (s.n or 0) + 1; return s.n end)
  local global = mp.scoped("global", function(g) g.n = (g.n or 0) + 1; return g.n end)
  return {named = named, global = global}
end)

-- Reads scope a, then touches scope b (cold in a test: its load is held), then writes a from
-- what it read: an increment of a made meanwhile must not be lost.
expose("read_then_touch", function(p)
  local a = mp.scope.named(p.a)
  local v = a.n or 0
  local b = mp.scope.named(p.b)
  b.n = (b.n or 0) + 1
  a.n = v + 10
  return a.n
end)

expose("user_outside_auth", function()
  return mp.scope.user.n
end)

mp.serve()
