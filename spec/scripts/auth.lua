-- auth.lua: services behind mp.basicAuth (spec/test_auth.py). Each answers with mp.user and
-- counts calls in mp.scope.global; "public" is open to anyone and sees no user.
local mp = require("metaparticle")

local function counted(what)
  return function()
    local g = mp.scope.global
    g[what] = (g[what] or 0) + 1
    return { user = mp.user, calls = g[what], worker = mp.worker.id }
  end
end

mp.service("whoami", mp.basicAuth(counted("whoami"))).expose = true
mp.service("public", function()
  return { user = mp.user or mp.null, worker = mp.worker.id }
end).expose = true

-- Behind basicAuth but not exposed: answered -32601 like any unknown method, credentials or
-- not, so that a prober cannot tell it from a name that does not exist.
mp.service("unexposed", mp.basicAuth(counted("unexposed")))

-- Both orders of a topology and basicAuth (MPH_TEST_SPREAD workers; 1 asks for none).
local n = tonumber(os.getenv("MPH_TEST_SPREAD") or "1")
mp.service("auth-of-spread", mp.basicAuth(mp.spread(n, counted("outer")))).expose = true
mp.service("spread-of-auth", mp.spread(n, mp.basicAuth(counted("inner")))).expose = true

-- mp.shard with basicAuth on either side: a call forwarded to its shard's worker runs as
-- the user the worker that took it verified.
local function key(p) return type(p) == "table" and p.k or 0 end
mp.service("auth-of-shard", mp.basicAuth(mp.shard(n, key, counted("outer-shard")))).expose = true
mp.service("shard-of-auth", mp.shard(n, key, mp.basicAuth(counted("inner-shard")))).expose = true

-- A wrapper of our own hides the basicAuth handler from the host, which then checks no
-- credentials for it: its calls fail closed (-32004), never run without a user.
local hidden = mp.basicAuth(counted("hidden"))
mp.service("hidden", function(...) return hidden(...) end).expose = true

mp.serve()
