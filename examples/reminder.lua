-- reminder.lua: a durable timer (docs/outbox.md walks through it). "remind" sets a reminder
-- that fires every `every` seconds, `times` times in all. Each firing is a call of "fire"
-- (a service only mp.self reaches) that counts itself and, in the same transaction, sends
-- the next one with a delay. The timer is a message in the storage: it survives restarts and
-- crashes, and fires once per period, never twice and never lost.
local mp = require("metaparticle")

mp.service("remind", function(r)
  local g = mp.scope.global
  if g.pending then mp.cancel(g.pending) end -- a new reminder replaces the old one
  g.text, g.left, g.fired = r.text, r.times, 0
  g.pending = mp.send(mp.self, "fire", { every = r.every }, { delay = r.every })
  return { text = r.text, every = r.every, times = r.times }
end).expose = true

mp.service("fire", function(r)
  local g = mp.scope.global
  g.fired, g.left = g.fired + 1, g.left - 1
  mp.log("reminder: " .. g.text .. " (" .. g.fired .. ")")
  if g.left > 0 then
    g.pending = mp.send(mp.self, "fire", r, { delay = r.every })
  else
    g.pending = nil
  end
end)

mp.service("reminders", function()
  local g = mp.scope.global
  return { text = g.text or mp.null, fired = g.fired or 0, left = g.left or 0 }
end).expose = true

-- Stops the reminder: its next firing is removed with this call's writes.
mp.service("stop", function()
  local g = mp.scope.global
  local stopped = g.pending ~= nil and mp.cancel(g.pending)
  g.pending, g.left = nil, 0
  return { stopped = stopped }
end).expose = true

mp.serve()
