-- orders.lua: an order placed once even when the client retries, and its notification sent
-- exactly once to another service (docs/outbox.md walks through it).
--
-- "place" records the order and, in the same transaction, sends a notification to the mail
-- service with mp.send: the message commits with the order or not at all, and is delivered
-- after the commit, retried until the mail service answers, each time with the same
-- Idempotency-Key (the message's id), so an mphost mail service runs it once. A client that
-- lost its reply retries with its own Idempotency-Key and gets the stored reply: the order is
-- placed once. The same script serves as the mail service (port 3001 unless MAIL_URL says
-- otherwise), where "notify" counts what it was asked to send.
local mp = require("metaparticle")

local MAIL = os.getenv("MAIL_URL") or "http://127.0.0.1:3001/"

mp.service("place", function(order)
  local g = mp.scope.global
  g.placed = (g.placed or 0) + 1
  local id = "order-" .. g.placed
  mp.scope.named(id).order = order
  mp.send(MAIL, "notify", { order = id, item = order.item })
  return { order = id }
end).expose = true

mp.service("orders", function()
  return { placed = mp.scope.global.placed or 0 }
end).expose = true

-- The mail service's side.
mp.service("notify", function(n)
  local g = mp.scope.global
  g.mails = (g.mails or 0) + 1
  g.last = n
  return true
end).expose = true

mp.service("mails", function()
  local g = mp.scope.global
  return { sent = g.mails or 0, last = g.last or mp.null }
end).expose = true

mp.serve()
