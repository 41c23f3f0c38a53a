-- server5.lua: chapter 5 of the walkthrough, a counter kept in the global scope. Every call
-- is one transaction: concurrent calls, on one host or many sharing storage, never lose a
-- count.
local mp = require("metaparticle")

local svc = mp.service("simple-storage", function(request)
  local g = mp.scope.global
  g.requests = (g.requests or 0) + 1
  return { requests = g.requests }
end)
svc.expose = true

mp.serve()
