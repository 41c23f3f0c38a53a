-- Chapter 2 of the Metaparticle walkthrough: a replicated service. mp.spread(3, fn) runs
-- three workers; each call runs on whichever of them accepted its connection, and the answer
-- says which one (the original returned os.hostname() of its container).
local mp = require("metaparticle")

local svc = mp.service("replicated-service", mp.spread(3, function(data)
  return { request = data, server = mp.worker.id }
end))
svc.expose = true

mp.serve()
