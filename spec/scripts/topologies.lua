-- topologies.lua: mp.shard and mp.scatter seen from inside (spec/test_topologies.py). Every
-- answer says which worker produced it.
local mp = require("metaparticle")

-- The scatter of "gather" has MPH_TEST_SCATTER leaves (3 unless set): a test that wants ten
-- workers asks for them.
local N = tonumber(os.getenv("MPH_TEST_SCATTER") or "3")

-- A worker started after FLAG_FILE appears cannot load: a replacement that is not coming.
local flag = os.getenv("MPH_TEST_BROKEN_FLAG")
if flag and io.open(flag) then
  error("refusing to load: " .. flag .. " exists")
end

-- Topologies do not nest: a script that tries fails to load.
if os.getenv("MPH_TEST_NEST") then
  mp.shard(3, function() return 1 end, mp.scatter(3, function() end, function() end))
end

local function here(key) return { key = key, worker = mp.worker.id } end

-- The key is the call's first param, whatever it is.
local function first(k) return k end

mp.service("by-key", mp.shard(3, first, here)).expose = true

-- keyfn returns what the call names: a table, a float, nil, a boolean.
local odd = { table = {}, float = 1.5, ["nil"] = nil, boolean = true, huge = 2 ^ 60 + 1 }
mp.service("odd-key", mp.shard(3, function(what) return odd[what] end, here)).expose = true

-- A counter per key on the key's worker.
mp.service("count", mp.shard(3, first, function(key)
  local g = mp.scope.global
  g[key] = (g[key] or 0) + 1
  return { key = key, count = g[key], worker = mp.worker.id }
end)).expose = true

-- Runs for `seconds` in a C call (which the time limit's hook cannot interrupt) on the key's
-- worker, after creating file `started`. The sleep dies with the worker (setpriv's
-- --pdeathsig): a worker killed meanwhile leaves no sleeper behind.
mp.service("sleep", mp.shard(3, first, function(key, seconds, started)
  io.open(started, "w"):close()
  os.execute("exec setpriv --pdeathsig KILL sleep " .. seconds)
  return here(key)
end)).expose = true

mp.service("gather", mp.scatter(N, function(...)
  return { worker = mp.worker.id, args = mp.array({ ... }) }
end, function(results) return results end)).expose = true

-- Leaf 2 raises: error("...") or mp.error with a code and data.
mp.service("leaf-raises", mp.scatter(3, function(how)
  if mp.worker.id == 2 then
    if how == "error" then error("leaf 2 failed") end
    mp.error(-32042, "leaf 2 refuses", { worker = 2 })
  end
  return mp.worker.id
end, function(results) return results end)).expose = true

local function exists(path)
  local f = io.open(path)
  if f then f:close() end
  return f ~= nil
end

-- Leaf `who` sleeps `seconds` (for a client that leaves, and a stop, while it runs); with
-- `gate`, until file `gate` exists instead (`seconds` at most).
mp.service("slow-leaf", mp.scatter(3, function(who, seconds, started, gate)
  if mp.worker.id == who then
    if started then io.open(started, "w"):close() end
    if gate then
      local t = os.time()
      while not exists(gate) and os.time() - t < seconds do os.execute("sleep 0.01") end
    else
      os.execute("sleep " .. seconds)
    end
  end
  return mp.worker.id
end, function(results) return results end)).expose = true

-- Routers may not use scopes where the call arrives.
mp.service("keyfn-scope", mp.shard(3, function() return mp.scope.global.k or 1 end,
  here)).expose = true
mp.service("merge-scope", mp.scatter(3, function() return mp.worker.id end, function(results)
  mp.scope.global.merged = #results
  return results
end)).expose = true

mp.serve()
