-- hosts.lua: mp.shard and mp.scatter over several hosts (spec/test_hosts.py). Every answer
-- says where it ran: the host and the worker.
local mp = require("metaparticle")

-- Shards of every topology here (4 unless set): over 3 hosts, hosts 1, 2, 3 run shards 1, 2, 3
-- on their worker 1, and host 1 runs shard 4 on its worker 2.
local N = tonumber(os.getenv("MPH_TEST_SHARDS") or "4")

local function first(k) return k end

local function here(key)
  return { key = key, host = mp.worker.host, hosts = mp.worker.hosts, worker = mp.worker.id }
end

mp.service("by-key", mp.shard(N, first, here)).expose = true

-- A counter per key, on the key's shard.
mp.service("count", mp.shard(N, first, function(key)
  local g, k = mp.scope.global, tostring(key)
  g[k] = (g[k] or 0) + 1
  return { key = key, count = g[k], host = mp.worker.host, worker = mp.worker.id }
end)).expose = true

-- Every leaf says where it ran and what it got.
mp.service("gather", mp.scatter(N, function(...)
  return { host = mp.worker.host, worker = mp.worker.id, args = mp.array({ ... }) }
end, function(results) return results end)).expose = true

-- The verified user goes with the call to the key's host; each user counts its own calls.
mp.service("whoami", mp.basicAuth(mp.shard(N, first, function(key)
  local u = mp.scope.user
  u.calls = (u.calls or 0) + 1
  return { key = key, user = mp.user, calls = u.calls, host = mp.worker.host }
end))).expose = true

-- Where a call that is not routed runs.
mp.service("where", function()
  return { host = mp.worker.host, hosts = mp.worker.hosts, worker = mp.worker.id,
           count = mp.worker.count }
end).expose = true

mp.serve()
