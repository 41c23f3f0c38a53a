-- hosts.lua: bench/hosts.sh's script. "sharded" has one shard, which --peers puts on host 1:
-- a call to host 1 is answered where it arrives, one to host 2 is forwarded to host 1.
-- "simple-service" is the same echo without routing (bench/rpc.lua's default method).
local mp = require("metaparticle")

local function echo(request) return { ["request-was"] = request } end

mp.service("sharded", mp.shard(1, function() return 0 end, echo)).expose = true
mp.service("simple-service", echo).expose = true

mp.serve()
