-- bank.lua: the services bench/scopes.sh measures. Accounts start with 1000 (no seeding),
-- transfers move between two named scopes; count is a counter per named scope; user_count
-- is chapter 7's counter per user and in total, behind mp.basicAuth when BENCH_AUTH=1 (the
-- user's scope), else on a named scope of the same size (the same work, without auth).
local mp = require("metaparticle")

local function expose(name, fn)
  mp.service(name, fn).expose = true
end

local function account(id)
  return mp.scope.named("account:" .. id)
end

expose("transfer", function(p)
  local from, to = account(p.from), account(p.to)
  local have = from.balance or 1000
  if have < p.amount then mp.error(-32010, "insufficient funds") end
  from.balance = have - p.amount
  to.balance = (to.balance or 1000) + p.amount
  return true
end)

expose("count", function(p)
  local s = mp.scope.named(p.name)
  s.n = (s.n or 0) + 1
  return s.n
end)

local auth = os.getenv("BENCH_AUTH") == "1"
local function counter()
  local u = auth and mp.scope.user or mp.scope.named("user:anonymous")
  local g = mp.scope.global
  u.requests = (u.requests or 0) + 1
  g.requests = (g.requests or 0) + 1
  return { user = mp.user, requests = u.requests, total = g.requests }
end
expose("user_count", auth and mp.basicAuth(counter) or counter)

mp.serve()
