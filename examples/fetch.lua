-- fetch.lua: a service that asks another service (docs/fetch.md walks through it). "ask" sends
-- its request to examples/server1.lua's echo service (on port 3001 unless ECHO_URL says
-- otherwise) with mp.rpc, and keeps in its global scope how often it asked and the last
-- answer, which "learned" shows. "peer-health" reads the other server's /healthz with
-- mp.fetch.
local mp = require("metaparticle")

local ECHO = os.getenv("ECHO_URL") or "http://127.0.0.1:3001/"

local ask = mp.service("ask", function(request)
  -- Ask first, then touch the scope: a handler that waits after reading a scope runs again
  -- when another call changed that scope meanwhile (docs/fetch.md, "Transactions").
  local answer, err = mp.rpc(ECHO, "simple-service", { request }, { timeout = 5 })
  if err then error(err) end -- its error, or -32008 when no JSON-RPC answer came back
  local g = mp.scope.global
  g.asked = (g.asked or 0) + 1
  g.last = answer
  return { asked = g.asked, answer = answer }
end)
ask.expose = true

-- What it has learned so far (reads only).
mp.service("learned", function()
  local g = mp.scope.global
  return { asked = g.asked or 0, last = g.last or mp.null }
end).expose = true

local health = mp.service("peer-health", function()
  local res, err = mp.fetch(ECHO .. "healthz", { timeout = 2 })
  if not res then return { up = false, why = err } end
  return { up = res.status == 200, status = res.status }
end)
health.expose = true

mp.serve()
