-- server1.lua: chapter 1 of the walkthrough, a service that echoes its request.
local mp = require("metaparticle")

local svc = mp.service("simple-service", function(request)
  return { ["request-was"] = request }
end)
svc.expose = true

mp.serve()
