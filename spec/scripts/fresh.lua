-- fresh.lua: reads that must see every acknowledged write (spec/test_fresh_reads.py). Three
-- workers (mp.spread), each answering with its id; a counter per scope (the global scope, or
-- the named scope `name`), read strictly (get) or from the worker's snapshot (get_cached).
local mp = require("metaparticle")

local function scope(name)
  if name == nil or name == "" then return mp.scope.global end
  return mp.scope.named(name)
end

mp.service("incr", mp.spread(3, function(name)
  local s = scope(name)
  s.n = (s.n or 0) + 1
  return { n = s.n, worker = mp.worker.id }
end)).expose = true

mp.service("get", mp.spread(3, function(name)
  return { n = scope(name).n or 0, worker = mp.worker.id }
end)).expose = true

local cached = mp.service("get_cached", mp.spread(3, function(name)
  return { n = scope(name).n or 0, worker = mp.worker.id }
end))
cached.expose = true
cached.reads = "cached"

mp.serve()
