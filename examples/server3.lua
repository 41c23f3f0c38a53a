-- Chapter 3 of the Metaparticle walkthrough: a sharded service. mp.shard(3, keyfn, fn) runs
-- three workers; keyfn picks the shard of each call where it arrives (here the length of the
-- user's name: worker #user % 3 + 1), and fn runs on that worker, so the calls of one user
-- always reach the same worker, whichever worker accepted them. The answer says which.
local mp = require("metaparticle")

local svc = mp.service("sharded-service", mp.shard(3, function(data)
  return #data.user
end, function(data)
  return { user = data.user, shard = mp.worker.id }
end))
svc.subservices.shard.expose = true -- the original's spelling of svc.expose = true

mp.serve()
