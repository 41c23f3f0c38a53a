local mp = require("metaparticle")

local svc = mp.service("simple-user-storage", mp.basicAuth(function(request)
  local u, g = mp.scope.user, mp.scope.global
  u.requests = (u.requests or 0) + 1
  g.requests = (g.requests or 0) + 1
  return { user = mp.user, requests = u.requests, total = g.requests }
end))
svc.expose = true

mp.serve()
