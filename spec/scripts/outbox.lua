-- outbox.lua: services that send with mp.send and count what mp.self delivers
-- (spec/test_outbox.py).
local mp = require("metaparticle")

local function target_of(t)
  if t == "self" then return mp.self end
  return t
end

-- send(target, method, params, opts) -> the id; counts the sends it committed in sent.
mp.service("send", function(target, method, params, opts)
  local g = mp.scope.global
  g.sent = (g.sent or 0) + 1
  return mp.send(target_of(target), method, params, opts)
end).expose = true

-- send-raise: sends, writes, then raises: nothing of it may commit or go out.
mp.service("send-raise", function(target, method, params)
  local g = mp.scope.global
  g.sent = (g.sent or 0) + 1
  mp.send(target_of(target), method, params)
  error("raised after sending")
end).expose = true

-- send-many(target, n): one call sending n messages (n of "count").
mp.service("send-many", function(target, n)
  local g = mp.scope.global
  g.sent = (g.sent or 0) + n
  for i = 1, n do mp.send(target_of(target), "count", {i}) end
  return n
end).expose = true

-- count(i): what mp.self delivers; not exposed (mp.self reaches it all the same).
mp.service("count", function(i)
  local g = mp.scope.global
  g.got = (g.got or 0) + 1
  local seen = mp.scope.named("seen")
  local k = "k" .. tostring(i)
  seen[k] = (seen[k] or 0) + 1
  return g.got
end)

-- slow-count(url): as count, after waiting in mp.fetch(url) (a slow one: longer than a lease).
mp.service("slow-count", function(url)
  local res, err = mp.fetch(url)
  if res == nil then error("fetch failed: " .. err) end
  local g = mp.scope.global
  g.got = (g.got or 0) + 1
  return g.got
end)

-- seen() -> {keys, max}: how many distinct messages count ran, and the most times one ran.
mp.service("seen", function()
  local n, max = 0, 0
  for _, v in pairs(mp.scope.named("seen")) do
    n = n + 1
    if v > max then max = v end
  end
  return {keys = n, max = max}
end).expose = true

-- fails(): a handler that always raises (a final JSON-RPC error).
mp.service("fails", function()
  local g = mp.scope.global
  g.failed_runs = (g.failed_runs or 0) + 1
  error("no thanks")
end)

-- stats() -> {sent, got, ticks, failed_runs}
mp.service("stats", function()
  local g = mp.scope.global
  return {sent = g.sent or 0, got = g.got or 0, ticks = g.ticks or 0,
          failed_runs = g.failed_runs or 0}
end).expose = true

-- cancel(id) -> what mp.cancel says; cancel-raise: cancels, then raises.
mp.service("cancel", function(id) return mp.cancel(id) end).expose = true
mp.service("cancel-raise", function(id)
  mp.cancel(id)
  error("raised after cancelling")
end).expose = true

-- tick(period, left): a job that re-sends itself with a delay, left more times.
local function tick(period, left)
  local g = mp.scope.global
  g.ticks = (g.ticks or 0) + 1
  if left > 1 then mp.send(mp.self, "tick", {period, left - 1}, {delay = period}) end
end
mp.service("tick", tick)
mp.service("start-ticks", function(period, n)
  mp.send(mp.self, "tick", {period, n}, {delay = period})
  return true
end).expose = true

-- bad(what): mp.send misused.
mp.service("bad", function(what)
  if what == "target" then return mp.send("ftp://x/", "m") end
  if what == "both" then return mp.send(mp.self, "m", {}, {delay = 1, at = 1}) end
  if what == "params" then return mp.send(mp.self, "m", "text") end
  if what == "option" then return mp.send(mp.self, "m", {}, {later = 1}) end
  return mp.send(mp.self, "")
end).expose = true

mp.serve()
