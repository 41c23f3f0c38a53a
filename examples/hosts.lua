-- Chapters 3 and 4 across machines (docs/hosts.md): the same script on every host of a
-- deployment (--peers lists them all). mp.shard(3, ...) puts its three shards one per host,
-- so a user's calls reach the same host and worker from any host; each shard counts its
-- user's calls in the shared storage (Redis). mp.scatter(3, ...) asks every shard at once.
local mp = require("metaparticle")

local sharded = mp.service("sharded-service", mp.shard(3, function(data)
  return data.user
end, function(data)
  local users = mp.scope.named("users")
  users[data.user] = (users[data.user] or 0) + 1
  return { user = data.user, calls = users[data.user], host = mp.worker.host,
           worker = mp.worker.id }
end))
sharded.expose = true

local everywhere = mp.service("everywhere", mp.scatter(3, function()
  return "host " .. mp.worker.host .. " of " .. mp.worker.hosts .. ", worker " .. mp.worker.id
end, function(results)
  return results
end))
everywhere.expose = true

mp.serve()
