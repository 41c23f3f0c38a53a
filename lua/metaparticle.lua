-- metaparticle.lua: the Lua half of mphost's "metaparticle" module.
--
-- The bridge (lua/vm.c) runs this chunk once per state with a table of C helpers `C`
-- and keeps the two tables it returns: the public module (what `require("metaparticle")`
-- gives a script) and the internal table the C transaction runner calls.
--
-- How scope writes are recorded. A scope is a JSON object of top-level keys. A handler sees
-- it through a root: an empty table whose metatable routes every read and write. Reading a
-- key whose value is a table hands out a private deep copy, made once per transaction and
-- cached, so nested data is plain Lua data: `#`, ipairs, table.insert/remove/sort/concat,
-- unpack and assignment at any depth all work natively (Lua 5.1 ignores __len/__pairs on
-- tables, so a proxy at every level could not give this). When the handler returns, each
-- key the handler wrote or copied is compared with the value it started from; keys that
-- differ are the write set, encoded to JSON. The cost of a transaction therefore grows with
-- the keys it touches, never with the size of the scope.
--
-- Scope state, per scope name, kept here and driven by the runner:
--   base      committed values read since the load (never handed out: readers get copies)
--   cold      the runner's handle on the others, still JSON text outside the Lua heap
--             (lua/scopes.c, "Cold values"): C.cold_take moves one into base when first read
--   inflight  writes of the batch whose commit is in flight (DELETED marks a deletion)
--   pending   writes of transactions that ran after it, waiting for the next commit
--   pending_json  key -> JSON text (false: deleted) of `pending`, what the commit sends
--   changes   counts the changes of what a read sees (writes merged, pending or all reset):
--             an attempt that paused in mp.fetch after reading compares it (I.stamp)
-- A read looks in pending, then inflight, then base, then cold: transactions of one scope run
-- one after another on the newest (speculative) state, and nothing is answered before it is
-- durable.

local C = ...

local type, pairs, next, setmetatable, getmetatable = type, pairs, next, setmetatable, getmetatable
local error, tostring, select, rawget, pcall = error, tostring, select, rawget, pcall
local tonumber = tonumber
local unpack = unpack
local tconcat = table.concat
local floor = math.floor
local isyieldable = coroutine.isyieldable

local null, DELETED = C.null, C.deleted
local array_mt, object_mt = C.array_mt, C.object_mt
local raw_next, raw_pairs = next, pairs

local M = {null = null}
local I = {}

-- mp.c.NAME: the C functions the embedding program registered (mph_host_register_function);
-- the bridge fills this table.
M.c = {}
I.c = M.c

-- Error objects raised by mp.error and by the host; the bridge recognises this metatable.
local error_mt = {__tostring = function(e) return tostring(e.message) end}
I.error_mt = error_mt
-- JSON text to and from Lua values, for lua/fetch.lua (mp.fetch's bodies, mp.rpc).
I.encode, I.decode = C.encode, C.decode

local function raise(code, message, data, level)
  error(setmetatable({code = code, message = message, data = data}, error_mt), level)
end

-- A JSON-RPC error code: an integer in the int32 range, and not 0 (the bridge's mark of a
-- result; JSON-RPC leaves 0 unused).
local function valid_code(code)
  return type(code) == "number" and code == floor(code) and code >= -2147483648 and
    code <= 2147483647 and code ~= 0
end

function M.error(code, message, data)
  if not valid_code(code) then
    error("mp.error: code must be a nonzero integer in the int32 range", 2)
  end
  if message ~= nil and type(message) ~= "string" then
    error("mp.error: message must be a string", 2)
  end
  raise(code, message or "Server error", data, 2)
end

-- The test builds' allocation hook (lua/vm.c, C.fail_allocations): the next `skip` Lua
-- allocations go through, then `count` fail. nil where the build or the run has no hook.
M.test_fail_allocations = C.fail_allocations

function M.array(t)
  if t == nil then t = {} end
  if type(t) ~= "table" then error("mp.array expects a table", 2) end
  return setmetatable(t, array_mt)
end

function M.object(t)
  if t == nil then t = {} end
  if type(t) ~= "table" then error("mp.object expects a table", 2) end
  return setmetatable(t, object_mt)
end

local LEVELS = {trace = 0, debug = 1, info = 2, warn = 3, error = 4}

-- mp.log(...) logs at info; mp.log.warn(...) etc. choose the level.
local function log_at(level)
  return function(...)
    local n = select("#", ...)
    local parts = {}
    for i = 1, n do parts[i] = tostring((select(i, ...))) end
    C.log(level, tconcat(parts, " "))
  end
end
M.log = setmetatable({}, {
  __call = function(_, ...) return log_at(LEVELS.info)(...) end,
  __index = function(t, name)
    local level = LEVELS[name]
    if not level then return nil end
    local f = log_at(level)
    rawset(t, name, f)
    return f
  end,
})

-- ---- Services ----

local services = {}
I.services = services

-- Handlers that need a verified user: what mp.basicAuth returns, and the handlers a topology
-- makes of one (see inherit_auth). Weak keys: a handler dropped by the script goes.
local needs_user = setmetatable({}, {__mode = "k"})

-- The original walkthrough exposes a sharded service with `svc.subservices.shard.expose =
-- true` and a scatter/gather one with `svc.subservices.gather.expose = true`: both are
-- aliases of svc.expose here, on any service.
local function subservices_of(svc)
  local alias = setmetatable({}, {
    __index = function(_, k)
      if k == "expose" then return svc.expose end
    end,
    __newindex = function(_, k, v)
      if k ~= "expose" then error("svc.subservices: only expose can be set", 2) end
      svc.expose = v
    end,
  })
  return {shard = alias, gather = alias}
end

function M.service(name, handler)
  if type(name) ~= "string" or name == "" then
    error("mp.service: name must be a non-empty string", 2)
  end
  if name:sub(1, 4) == "rpc." then
    error("mp.service: \"" .. name .. "\": names starting with \"rpc.\" are reserved by " ..
          "JSON-RPC (the host answers rpc.discover)", 2)
  end
  if type(handler) ~= "function" then
    error("mp.service: handler must be a function", 2)
  end
  local svc = {name = name, handler = handler, expose = false}
  svc.subservices = subservices_of(svc)
  services[name] = svc
  -- The host checks a call's credentials before the call starts (on a pool thread, since
  -- hashes are slow): it has to know which services need them without running Lua.
  C.service(name, needs_user[handler] == true)
  return svc
end

-- rpc.discover: an OpenRPC 1.2 document of the exposed services, which may describe
-- themselves with svc.description (a string), svc.params (content descriptors) and
-- svc.result (one). Set like svc.expose, at any time before the call: read at each call.
local function discover()
  local names = {}
  for name, svc in pairs(services) do
    if svc.expose == true and name ~= "rpc.discover" then names[#names + 1] = name end
  end
  table.sort(names)
  local methods = {}
  for i, name in ipairs(names) do
    local svc = services[name]
    local params = {}
    if type(svc.params) == "table" then
      for k, p in ipairs(svc.params) do params[k] = p end
    end
    methods[i] = {
      name = name,
      description = type(svc.description) == "string" and svc.description or nil,
      params = M.array(params),
      result = type(svc.result) == "table" and svc.result or {name = "result", schema = {}},
    }
  end
  return {
    openrpc = "1.2.6",
    info = {title = I.script_name or "mphost", version = C.VERSION},
    methods = M.array(methods),
  }
end
services["rpc.discover"] = {name = "rpc.discover", handler = discover, expose = true}

-- ---- Users ----
--
-- mp.basicAuth(fn): calls to fn need HTTP Basic credentials that the users file
-- (--users=FILE) verifies. The host verifies them before the handler runs and passes the
-- user's name in the attempt's record (rec.user, which C reads as the transaction's `user`);
-- mp.user reads it. The wrapper refuses a call without one (-32004): should a wrapper that
-- did not inherit the mark hide fn from the host, calls fail closed, never run unverified.

local UNAUTHORIZED = C.UNAUTHORIZED
local STORAGE_UNAVAILABLE = C.STORAGE_UNAVAILABLE

-- The handlers mp.shard and mp.scatter made (and mp.basicAuth's wrappers of them) -> which.
local routers = setmetatable({}, {__mode = "k"})

function M.basicAuth(fn)
  if type(fn) ~= "function" then
    error("mp.basicAuth: handler must be a function", 2)
  end
  local function protected(...)
    local rec = C.current()
    if rec == nil or rec.user == nil then raise(UNAUTHORIZED, "unauthorized", nil, 2) end
    return fn(...)
  end
  needs_user[protected] = true
  routers[protected] = routers[fn] -- it routes as fn does (I.run, check_inner)
  return protected
end

-- A handler that wraps fn needs a user when fn does (every topology wraps its fn in one).
local function inherit_auth(fn, wrapper)
  if needs_user[fn] then needs_user[wrapper] = true end
  return wrapper
end

-- mp.user: the verified user inside a basicAuth handler, nil elsewhere.
setmetatable(M, {
  __index = function(_, k)
    if k ~= "user" then return nil end
    local rec = C.current()
    return rec and rec.user
  end,
})

function M.serve()
  C.serve()
end

-- ---- Topologies ----
--
-- The script is the topology, as in Metaparticle: mp.spread(n, fn), mp.shard(n, keyfn, fn)
-- and mp.scatter(n, leaf, merge) ask for n workers (processes under one supervisor; the
-- largest n of the script, or --workers if larger, is how many run) and every worker serves
-- every service. A spread call runs on whichever worker accepted its connection, so its
-- handler just calls fn there. mp.shard and mp.scatter return routers: handlers that send
-- the call on to chosen workers (C.forward, lua/forward.c) in a role ("shard", "leaf") that
-- the worker it reaches reads in rec.role and answers by running the inner function itself.
--
-- A router may not use scopes on the worker that routes (keyfn, merge, and the router
-- itself once it has forwarded): each forwarded call is a transaction of its own on its
-- worker, and a router that took part in a transaction could be run again by a conflict,
-- forwarding the call a second time. So a forwarded call runs once per routing, and the
-- router commits nothing.

local MAX_WORKERS = 256

-- mp.worker = { id = 1..count, count = N, pid = ..., host = 1..hosts, hosts = H }: where this
-- state runs (host: which of the deployment's hosts, docs/hosts.md).
local worker = C.worker
M.worker = worker

local function check_workers(what, n)
  if type(n) ~= "number" or n ~= floor(n) or n < 1 or n > MAX_WORKERS then
    error(what .. ": the number of workers must be an integer from 1 to " .. MAX_WORKERS, 3)
  end
end

function M.spread(n, fn)
  check_workers("mp.spread", n)
  if type(fn) ~= "function" then
    error("mp.spread: handler must be a function", 2)
  end
  C.topology(n)
  return inherit_auth(fn, function(...) return fn(...) end)
end

local function check_inner(what, name, f)
  if type(f) ~= "function" then
    error(what .. ": " .. name .. " must be a function", 3)
  end
  if routers[f] then -- the inner call would have to forward again, which a forwarded one may not
    error(what .. ": " .. name .. " is a " .. routers[f] .. " handler (topologies do not nest)", 3)
  end
end

-- Runs the call on workers first..last in `role`; returns their results in worker order.
-- From here on the call may use no scope here; `after` says so to what runs next.
local function forward(rec, what, role, first, last, after)
  if raw_next(rec.roots) ~= nil then
    raise(-32000, what .. ": the call used a scope before it was routed; a call that " ..
      "forwards to other workers may not (it runs on them, in transactions of their own)", nil, 0)
  end
  rec.routing = after
  C.forward(role, first, last, isyieldable())
  return C.forwarded()
end

-- The handler of a topology `what`: a call forwarded here in `role` runs `inner` (and
-- forwards nothing); any other call is routed by route(rec, params...).
local function router(what, role, inner, route)
  local function handler(...)
    local rec = C.current()
    if rec == nil then error(what .. ": its handler runs only as a service handler", 2) end
    local r = rec.role
    if r == role then return inner(...) end
    if r ~= nil then
      raise(-32603, what .. ": another worker forwarded a call here as " .. r, nil, 0)
    end
    if rec.idem and what ~= "mp.shard" then -- its leaves' records could not commit as one
      raise(-32600, "Invalid Request: " .. what .. " services take no Idempotency-Key (their " ..
        "handlers run in transactions of their own on other workers)", nil, 0)
    end
    return route(rec, ...)
  end
  routers[handler] = what
  return inherit_auth(inner, handler) -- the user the host verified goes with each forward
end

-- mp.shard(n, keyfn, fn): keyfn(params...) -> an integer k (shard k % n + 1) or a string
-- (shard FNV-1a-32 % n + 1); fn runs on that shard's worker, of this host or of another one
-- (lua/forward.c, C.shard_target and "Where a shard runs").
function M.shard(n, keyfn, fn)
  check_workers("mp.shard", n)
  check_inner("mp.shard", "keyfn", keyfn)
  check_inner("mp.shard", "handler", fn)
  C.topology(n)
  return router("mp.shard", "shard", fn, function(rec, ...)
    rec.routing = "mp.shard: keyfn may not use a scope (it runs where the call arrives, " ..
      "before the call is routed)"
    local target, here = C.shard_target(keyfn(...), n)
    rec.routing = nil
    -- A keyed call is always forwarded, even to this worker: it runs keyed there, in a
    -- transaction of its own, whose commit holds its record beside its writes (I.run).
    if here and not rec.idem then return fn(...) end
    return forward(rec, "mp.shard", "shard", target, target,
      "mp.shard: a call forwarded to another worker may not use a scope where it arrived")[1]
  end)
end

-- mp.scatter(n, leaf, merge): leaf(params...) on workers 1..n at once, then merge(results),
-- an array in worker order, where the call arrived. A leaf that raised fails the call with
-- its error (the first in worker order, once every leaf has answered).
function M.scatter(n, leaf, merge)
  check_workers("mp.scatter", n)
  check_inner("mp.scatter", "leaf", leaf)
  check_inner("mp.scatter", "merge", merge)
  C.topology(n)
  return router("mp.scatter", "leaf", leaf, function(rec)
    return merge(forward(rec, "mp.scatter", "leaf", 1, n,
      "mp.scatter: merge may not use a scope (the leaves run in transactions of their own)"))
  end)
end

-- ---- Plain data helpers ----

local function deep_copy(v)
  if type(v) ~= "table" then return v end
  local t = {}
  for k, x in raw_pairs(v) do
    if type(x) == "table" then x = deep_copy(x) end
    t[k] = x
  end
  local mt = getmetatable(v)
  if mt == array_mt or mt == object_mt then setmetatable(t, mt) end
  return t
end

local function kind(t)
  local mt = getmetatable(t)
  if mt == array_mt or mt == object_mt then return mt end
  return nil
end

local function deep_equal(a, b)
  if a == b then return true end
  if type(a) ~= "table" or type(b) ~= "table" then return false end
  if kind(a) ~= kind(b) then return false end
  for k, x in raw_pairs(a) do
    if not deep_equal(x, rawget(b, k)) then return false end
  end
  for k in raw_pairs(b) do
    if rawget(a, k) == nil then return false end
  end
  return true
end

-- ---- Scope state ----

local states = {}

local cold_take, cold_drop, cold_keys = C.cold_take, C.cold_drop, C.cold_keys

function I.new_state(name, _, cold)
  local st = {name = name, base = {}, cold = cold, inflight = {}, pending = {}, pending_json = {},
    changes = 0}
  states[name] = st
  return st.base
end

function I.drop_state(name)
  states[name] = nil
end

-- The runner starts a commit: pending becomes inflight; returns the JSON write set.
function I.take_pending(name)
  local st = states[name]
  local json = st.pending_json
  st.inflight, st.pending, st.pending_json = st.pending, {}, {}
  return json
end

-- The in-flight commit is durable: fold its writes into base.
function I.commit_ok(name)
  local st = states[name]
  local base, cold = st.base, st.cold
  for k, v in raw_pairs(st.inflight) do
    if v == DELETED then base[k] = nil else base[k] = v end
    cold_drop(cold, k)
  end
  st.inflight = {}
end

-- A commit of another scope that ran on this one's pending writes failed: they are void (the
-- transactions that made them run again); the in-flight ones are not.
function I.drop_pending(name)
  local st = states[name]
  st.pending, st.pending_json = {}, {}
  st.changes = st.changes + 1
end

-- A commit failed or conflicted: every speculative write is void; returns base so the
-- runner can apply what the backend reported.
function I.reset_state(name, clear_base)
  local st = states[name]
  st.inflight, st.pending, st.pending_json = {}, {}, {}
  st.changes = st.changes + 1
  if clear_base then st.base = {} end
  return st.base
end

local function read_cold(st, k)
  if type(k) ~= "string" then return nil end -- scope keys are strings; cold ones too
  local v, err = cold_take(st.cold, st.base, k)
  if err then
    raise(STORAGE_UNAVAILABLE, "storage unavailable: scope " .. st.name .. ": the stored value " ..
      "of key " .. k .. " is not valid JSON: " .. err, nil, 0)
  end
  return v
end

local function read(st, k)
  local v = st.pending[k]
  if v == nil then
    v = st.inflight[k]
    if v == nil then
      v = st.base[k]
      if v == nil then return read_cold(st, k) end
      return v
    end
  end
  if v == DELETED then return nil end
  return v
end

-- ---- Roots ----

-- root -> record, for roots whose transaction is running. Entries are removed when the
-- transaction ends (not left to the collector: with a large heap, collections are rare and
-- the table would grow by one entry per call until the next one).
local roots = setmetatable({}, {__mode = "k"})
local root_mt = {__metatable = "mphost.scope"}

local function record_of(root, level)
  local r = roots[root]
  if r == nil then
    error("a scope was used after its handler returned", level + 1)
  end
  return r
end

root_mt.__index = function(root, k)
  local r = record_of(root, 2)
  local work = r.work
  local v = work[k]
  if v ~= nil then
    if v == DELETED then return nil end
    return v
  end
  v = read(r.state, k)
  if type(v) == "table" then
    v = deep_copy(v)
    work[k] = v
  end
  return v
end

root_mt.__newindex = function(root, k, v)
  local r = record_of(root, 2)
  if type(k) ~= "string" then
    error("mp.scope." .. r.display .. ": keys of a scope must be strings, got " .. type(k), 2)
  end
  if v == nil then v = DELETED end
  r.work[k] = v
  if r.keys and r.keypos[k] == nil then r.keys = nil end -- a new key: rebuild the key list
end

-- Keys visible to this transaction, in a stable order for next()/pairs().
local function key_list(r)
  if r.keys then return r.keys end
  local st, seen, list, pos = r.state, {}, {}, {}
  local function add(layer)
    for k, v in raw_pairs(layer) do
      if not seen[k] then
        seen[k] = true
        if v ~= DELETED then
          list[#list + 1] = k
          pos[k] = #list
        end
      end
    end
  end
  add(r.work)
  add(st.pending)
  add(st.inflight)
  add(st.base)
  for _, k in ipairs(cold_keys(st.cold)) do -- never in base: no DELETED among them
    if not seen[k] then
      seen[k] = true
      list[#list + 1] = k
      pos[k] = #list
    end
  end
  r.keys, r.keypos = list, pos
  return list
end

local function root_next(root, k)
  local r = record_of(root, 2)
  local list = key_list(r)
  local i = 0
  if k ~= nil then
    i = r.keypos[k]
    if i == nil then error("invalid key to 'next'", 2) end
  end
  while true do
    i = i + 1
    local key = list[i]
    if key == nil then return nil end
    local v = root[key]
    if v ~= nil then return key, v end
  end
end

root_mt.__mp_plain = function(root)
  local t = {}
  for k, v in root_next, root do t[k] = v end
  return t
end

-- Lua 5.1 ignores __pairs, so the global next and pairs learn about roots here (the locals
-- above keep the raw ones). ipairs, unpack, # and table.* need nothing: a root has only
-- string keys, which they do not see.
_G.next = function(t, k)
  if roots[t] then return root_next(t, k) end
  return raw_next(t, k)
end

_G.pairs = function(t)
  if roots[t] then return root_next, t, nil end
  return raw_pairs(t)
end

-- `display` is how messages name the scope after "mp.scope." ("global", 'named("a")').
local function new_root(name, display)
  local root = setmetatable({}, root_mt)
  roots[root] = {name = name, display = display, state = states[name], work = {}}
  return root
end

-- Ends a root's transaction: returns its write set (key -> JSON text or false), or nil.
local function finish_root(root)
  local r = roots[root]
  if raw_next(root) ~= nil then
    raise(-32000, "mp.scope." .. r.display .. ": keys of a scope must be strings " ..
      "(was table.insert or rawset used on the scope itself?)", nil, 0)
  end
  local writes
  for k, v in raw_pairs(r.work) do
    if v == DELETED then v = nil end
    if not deep_equal(v, read(r.state, k)) then
      writes = writes or {}
      if v == nil then
        writes[k] = false
      else
        writes[k] = C.encode(v, r.display .. "." .. k)
      end
    end
  end
  roots[root] = nil -- only now: a value that holds the root itself encodes as a cycle
  return writes
end

-- Merging write sets into the pending state must not stop half-way (an out-of-memory error
-- would leave part of a failed transaction to be committed with the next batch). So it runs in
-- two steps: prepare decodes every value and makes room for every key in the pending tables,
-- recording the keys it added (out of memory here: the caller takes them out again, which
-- allocates nothing); apply then only assigns to keys that exist, which allocates nothing.
-- (With several scopes per transaction, as mp.scope.named will bring, the same two steps
-- span all of them.)
local HOLD = {} -- the value of a key made room for; replaced by apply or taken out

-- Adds key k to t (as HOLD) unless it is there, noting (t, k) in `made` first.
local function make_room(t, k, made)
  if t[k] == nil then
    local n = #made
    made[n + 1] = t
    made[n + 2] = k
    t[k] = HOLD
  end
end

local function prepare(sets, decoded, made)
  for name, writes in raw_pairs(sets) do
    if writes then
      local st, values = states[name], {}
      decoded[name] = values
      for k, json in raw_pairs(writes) do
        if json then values[k] = C.decode(json) else values[k] = DELETED end
        make_room(st.pending, k, made)
        make_room(st.pending_json, k, made)
      end
    end
  end
end

-- Takes out what prepare added (assigning nil allocates nothing).
local function unprepare(made)
  for i = 1, #made, 2 do
    local t, k = made[i], made[i + 1]
    if k ~= nil then t[k] = nil end
  end
end

local function apply(st, writes, values)
  local pending, pending_json = st.pending, st.pending_json
  st.changes = st.changes + 1
  for k, json in raw_pairs(writes) do
    pending_json[k] = json
    pending[k] = values[k]
  end
end

-- ---- mp.scope ----
--
-- Each scope is stored under a name of its own kind, so that no two kinds can meet:
-- "global", "u:" .. user for mp.scope.user, "n:" .. name for mp.scope.named(name); the
-- outbox's (lua/outbox.lua) are "o:" .. bucket and "x:" .. bucket, which scripts cannot name.

local MAX_SCOPE_NAME = 200

local function current_record(what, level)
  local rec = C.current()
  if rec == nil then
    error(what .. " is only available inside a service handler", level + 1)
  end
  return rec
end

-- The root of scope `key` in this attempt, loading the scope first if need be.
local function open_scope(rec, key, display)
  if rec.routing then raise(-32000, rec.routing, nil, 0) end
  local root = rec.roots[key]
  if root then return root end
  -- C.acquire answers true (ready) or false, code, message. Where it can, it waits for a
  -- load by yielding and is resumed with nothing: then ask again. Where it cannot (inside
  -- a callback C called, e.g. a table.sort comparator, or in a coroutine the handler made)
  -- it answers false: the attempt is void and runs again once the scope has loaded.
  local ok, code, message = C.acquire(key, isyieldable())
  while ok == nil do ok, code, message = C.acquire(key, isyieldable()) end
  if not ok then raise(code, message, nil, 0) end
  root = new_root(key, display)
  rec.roots[key] = root
  return root
end

local function quoted(name)
  return string.format("%q", name):gsub("\\\n", "\\n")
end

-- mp.scope.named(name): the scope called `name`, a string of 1 to 200 bytes.
local function named(name)
  if type(name) ~= "string" then
    error("mp.scope.named: the name must be a string, got " .. type(name), 2)
  end
  if #name < 1 or #name > MAX_SCOPE_NAME or name:find("\0", 1, true) then
    error("mp.scope.named: the name must be 1 to " .. MAX_SCOPE_NAME ..
      " bytes with no NUL byte, got " .. #name .. " bytes", 2)
  end
  local rec = current_record("mp.scope.named", 2)
  return open_scope(rec, "n:" .. name, "named(" .. quoted(name) .. ")")
end

M.scope = setmetatable({}, {
  __index = function(_, kind)
    if kind == "named" then return named end
    if kind == "global" then
      return open_scope(current_record("mp.scope.global", 2), "global", "global")
    end
    if kind == "user" then
      local rec = current_record("mp.scope.user", 2)
      local user = rec.user
      if type(user) ~= "string" then
        error("mp.scope.user is only available in a handler behind mp.basicAuth", 2)
      end
      return open_scope(rec, "u:" .. user, "user")
    end
    return nil
  end,
  __newindex = function() error("mp.scope is read-only", 2) end,
})

-- mp.scoped(name, fn) -> what fn(scope) returns: the original storage library's form
-- (`scoped('global', (scope) => ...)`). "global" and "user" are those scopes, any other name
-- mp.scope.named(name); the same rules hold (inside a handler only).
function M.scoped(name, fn)
  if type(fn) ~= "function" then
    error("mp.scoped: fn must be a function, got " .. type(fn), 2)
  end
  if name == "global" or name == "user" then return fn(M.scope[name]) end
  return fn(named(name))
end

-- ---- Idempotency keys (lua/idem.c) ----
--
-- A call with a key opens its record's bucket (an internal scope, "i:N", that no mp.scope
-- name reaches) before its handler runs, as a scope of its own transaction: a record found
-- (and not expired) is the outcome and the handler never runs; else the handler runs and its
-- reply is written into the bucket beside its writes, committed with them. rec.idem = {scope,
-- key, req (the request's fingerprint), now, exp, every (seconds between prunings), probe (no
-- attempt has found the record absent in a state known current yet)}; rec.fail: the error
-- the last attempt raised, which this one only stores.

local idem_arm, idem_outcome, result_text = C.idem_arm, C.idem_outcome, C.result_text
local idem_expired, idem_current, idem_absent = C.idem_expired, C.idem_current, C.idem_absent
local KEY_REUSED = "idempotency key reused with a different request"
local PRUNE = "~prune" -- a bucket's next pruning time (record keys start with "-" or "u")
local PRUNE_MAX = 1000 -- records one call deletes at most (lua/idem.c, "Expiry")

local function expired(r, now)
  return type(r) ~= "table" or type(r.e) ~= "number" or r.e <= now
end

-- Deletes the bucket's expired records once its pruning time has come: the values never read
-- are checked as JSON text in C, the others here; each is read again through the root, which
-- sees a newer record of the same key that is pending.
local function prune(bucket, idem)
  local now = idem.now
  local due = bucket[PRUNE]
  if type(due) == "number" and due > now then return end
  local st = roots[bucket].state
  local old = idem_expired(st.cold, now, PRUNE_MAX)
  for k, v in raw_pairs(st.base) do
    if #old >= PRUNE_MAX then break end
    if k ~= PRUNE and expired(v, now) then old[#old + 1] = k end
  end
  for i = 1, #old do
    local k = old[i]
    if k ~= PRUNE and expired(bucket[k], now) then bucket[k] = nil end
  end
  -- With PRUNE_MAX found there may be more: the bucket stays due for the next write.
  if #old < PRUNE_MAX then bucket[PRUNE] = now + idem.every end
end

-- The record of a reply: its expiry, the request's fingerprint, the code (0: a result), the
-- result's or the error data's JSON text, the error's message.
local function record(idem, code, text, message)
  return {e = idem.exp, q = idem.req, c = code, r = text, m = message}
end

-- The handler's results, on the arguments after rec or in rec.args (lua/txn.c, setup_attempt).
local function call_handler(rec, ...)
  if rec.args then return rec.handler(unpack(rec.args, 1, rec.nargs)) end
  return rec.handler(...)
end

local function run_keyed(rec, idem, ...)
  local bucket = open_scope(rec, idem.scope, "idempotency")
  local r = bucket[idem.key]
  if not expired(r, idem.now) then
    if r.q == idem.req then
      idem_outcome(tonumber(r.c) or 0, r.r, r.m, true)
    else
      idem_outcome(-32006, nil, KEY_REUSED, false)
    end
    return
  end
  local fail = rec.fail
  if fail then -- the last attempt raised fail: this one only stores it (it is the outcome)
    prune(bucket, idem)
    bucket[idem.key] = record(idem, fail.code, fail.data, fail.message)
    return
  end
  if idem.probe and not idem_current() then
    idem_absent() -- a read of the bucket; once it is checked the handler runs (lua/idem.c)
    return
  end
  idem_arm()
  C.set_result(call_handler(rec, ...))
  prune(bucket, idem)
  bucket[idem.key] = record(idem, 0, result_text())
end

-- What lua/outbox.lua builds mp.send and mp.cancel on: the running attempt's record, and a
-- scope's root in it (the outbox keeps its messages in scopes of their own kind, "o:" and
-- "x:", which no name a script gives can reach).
I.current, I.open_scope, I.raise, I.array = C.current, open_scope, raise, M.array

-- ---- The body of every call attempt's coroutine ----

-- Runs the handler (on the arguments after rec, or in rec.args when there are more than the
-- bridge passes on the stack), encodes its first result,
-- then computes every touched scope's write set and, only when nothing can interrupt the
-- attempt any more (the checkpoint ends the time limit's power to), merges them into the
-- pending state and tells the runner which scopes the transaction joined.
function I.run(rec, ...)
  if rec.idem and rec.role == nil and routers[rec.handler] == "mp.shard" then
    -- A client's keyed call to a shard: here it is only routed; the shard's worker runs it
    -- keyed (the key goes with it, lua/forward.c), its record committed with its writes.
    C.set_result(call_handler(rec, ...))
  elseif rec.idem then
    run_keyed(rec, rec.idem, ...)
  else
    C.set_result(call_handler(rec, ...))
  end
  if next(rec.roots) == nil then -- no scope touched: nothing to check, nothing to commit
    C.checkpoint(nil)
    return
  end
  -- A scope dropped while the handler ran (a failed commit of another call forgets it; it may
  -- even have loaded again since) leaves this attempt reading a state that is gone: its
  -- writes would go over data it never read. The checkpoint voids such an attempt.
  local stale
  for name, root in raw_pairs(rec.roots) do
    if roots[root].state ~= states[name] then stale = name end
  end
  local sets = {}
  for name, root in raw_pairs(rec.roots) do
    sets[name] = finish_root(root) or false
  end
  C.checkpoint(stale) -- past the time limit or void: fail now; after it only out-of-memory can
  local decoded, made = {}, {}
  local ok, err = pcall(prepare, sets, decoded, made)
  if not ok then
    unprepare(made)
    error(err, 0)
  end
  for name, writes in raw_pairs(sets) do
    if writes then apply(states[name], writes, decoded[name]) end
    C.join(name, writes and true or false)
  end
end

-- A stamp of what the attempt's scopes hold (lua/fetch.c, "Reads across a wait"): equal
-- stamps before and after a pause mean nothing it may have read has changed meanwhile; false
-- when a scope's state was dropped under it (C.checkpoint voids such an attempt anyway).
function I.stamp(rec)
  local n = 0
  for name, root in raw_pairs(rec.roots) do
    local st = roots[root].state
    if st ~= states[name] then return false end
    n = n + st.changes
  end
  return n
end

-- The attempt ended without committing (it raised, or it is abandoned): its roots refuse
-- further use, so a root kept in an upvalue cannot write into a later transaction.
function I.close_record(rec)
  for _, root in raw_pairs(rec.roots) do roots[root] = nil end
end

return M, I
