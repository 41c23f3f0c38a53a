-- fetch.lua: services that call out with mp.fetch and mp.rpc (spec/test_fetch.py). Most
-- answer what the exchange gave, as JSON: the response, or { err = message }.
local mp = require("metaparticle")

local function outcome(res, err)
  if res == nil then return { err = err } end
  return res
end

-- fetch(url [, opts]) -> the response or { err }
mp.service("fetch", function(url, opts)
  return outcome(mp.fetch(url, opts))
end).expose = true

-- rpc(url, method [, params [, opts]]) -> { result } or { error = { code, message, data } }
mp.service("rpc", function(url, method, params, opts)
  local result, rerr = mp.rpc(url, method, params, opts)
  if rerr then
    return { error = { code = rerr.code, message = rerr.message, data = rerr.data } }
  end
  return { result = result }
end).expose = true

-- rpc-raise: a remote error becomes this call's error (error(rerr) keeps code and data).
mp.service("rpc-raise", function(url, method, params)
  local result, rerr = mp.rpc(url, method, params)
  if rerr then error(rerr) end
  return result
end).expose = true

-- count(url): fetches first, then counts in the global scope (a conflict runs it again,
-- fetch included).
mp.service("count", function(url)
  local res, err = mp.fetch(url)
  if not res then error("fetch failed: " .. err) end
  local g = mp.scope.global
  g.n = (g.n or 0) + 1
  return g.n
end).expose = true

-- read-fetch-write(url): reads the count, fetches, then writes what it read plus one: exact
-- only if an attempt whose read went stale during the fetch runs again.
mp.service("read-fetch-write", function(url)
  local g = mp.scope.global
  local n = g.rfw or 0
  local res, err = mp.fetch(url)
  if not res then error("fetch failed: " .. err) end
  g.rfw = n + 1
  return g.rfw
end).expose = true

-- get-count: the counters, read only.
mp.service("get-count", function()
  local g = mp.scope.global
  return { n = g.n or 0, rfw = g.rfw or 0 }
end).expose = true

mp.service("ping", function() return "pong" end).expose = true

-- sorted(url): a fetch inside a table.sort comparator, where the coroutine cannot yield.
mp.service("sorted", function(url)
  local t = { 3, 1, 2 }
  table.sort(t, function(a, b)
    mp.fetch(url)
    return a < b
  end)
  return t
end).expose = true

-- in-coroutine(url): a fetch inside a coroutine the handler made.
mp.service("in-coroutine", function(url)
  return coroutine.wrap(function() return outcome(mp.fetch(url)) end)()
end).expose = true

-- caught(url): the comparator's error, caught: the handler goes on (nothing was left waiting).
mp.service("caught", function(url)
  local ok, err = pcall(table.sort, { 2, 1 }, function(a, b)
    mp.fetch(url)
    return a < b
  end)
  return { ok = ok, err = tostring(err) }
end).expose = true

-- whoami(url): behind basicAuth, fetches and answers with the user.
mp.service("whoami", mp.basicAuth(function(url)
  local res, err = mp.fetch(url)
  return { user = mp.user, status = res and res.status or mp.null, err = err }
end)).expose = true

-- Topologies over MPH_TEST_FETCH_WORKERS workers (1 unless set): every leaf and the shard's
-- handler fetch where they run.
local n = tonumber(os.getenv("MPH_TEST_FETCH_WORKERS") or "1")
mp.service("scatter", mp.scatter(n, function(url)
  local res, err = mp.fetch(url)
  return { worker = mp.worker.id, body = res and res.body or err }
end, function(results) return results end)).expose = true
mp.service("shard", mp.shard(n, function(k) return k end, function(k, url)
  local res, err = mp.fetch(url)
  return { worker = mp.worker.id, body = res and res.body or err }
end)).expose = true

mp.serve()
