-- Chapter 6 of the Metaparticle walkthrough: chapter 5's counter, replicated. Three workers
-- share one storage (file or Redis); every call is a transaction, so however the calls are
-- spread over the workers, each gets a distinct count and none is lost.
local mp = require("metaparticle")

local svc = mp.service("simple-storage", mp.spread(3, function(request)
  local g = mp.scope.global
  g.requests = (g.requests or 0) + 1
  return { requests = g.requests }
end))
svc.expose = true

mp.serve()
