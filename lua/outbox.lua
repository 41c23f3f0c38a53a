-- outbox.lua: the Lua half of mp.send, mp.cancel and mp.self (lua/outbox.c has the C half,
-- the delivery loop, and the why of the design).
--
-- lua/outbox.c runs this chunk once per state, after metaparticle.lua, with its C helpers
-- `O`, the public module `M` (to which it adds send, cancel and self) and the internal table
-- `I` (to which it adds outbox_services, the operations the delivery loop runs as
-- transactions of their own).
--
-- A message is a key of an outbox scope, "o:" .. bucket (O.BUCKETS of them), written by
-- mp.send like any other write of the handler: it commits with the handler's writes, in the
-- same atomic commit, or not at all. Its value:
--   t    the target: an http(s) URL, or "mp.self"
--   m    the method
--   p    the params as JSON text (an array or an object), or nil: none
--   u    the sender's verified user (mp.user), for an mp.self target behind mp.basicAuth
--   at   when it was first due (Unix milliseconds): --send-expiry counts from there
--   due  when it is due next (Unix milliseconds)
--   n    delivery attempts that failed so far
--   err  why the last one failed
--   lease, by  while a deliverer holds it: until when (Unix milliseconds), and its token
-- A message that expired is moved to "x:" .. bucket (the dead list) with `died` set.

local O, M, I = ...

local type, tostring, tonumber, error, next = type, tostring, tonumber, error, next
local setmetatable, unpack, floor = setmetatable, unpack, math.floor
local sub, format = string.sub, string.format

local current, open_scope, raise, array = I.current, I.open_scope, I.raise, I.array
local encode, decode, services = I.encode, I.decode, I.services

local BUCKETS, HOME = O.BUCKETS, O.HOME
local SELF = "mp.self"
local MAX_METHOD = 200

-- mp.self: the target that names this deployment's own services, exposed or not.
M.self = setmetatable({}, {
  __tostring = function() return SELF end,
  __newindex = function() error("mp.self is read-only", 2) end,
  __metatable = "mp.self",
})

local function pending_scope(b) return "o:" .. b end
local function dead_scope(b) return "x:" .. b end

local function bad(message)
  error("mp.send: " .. message, 3)
end

local function check_target(target)
  if target == M.self then return SELF end
  if type(target) ~= "string" or not (target:find("^https?://[^/]")) then
    bad("target must be an http:// or https:// URL, or mp.self")
  end
  if target:find("[%z\1-\32\127]") then bad("target: a URL may not hold spaces or controls") end
  return target
end

-- When the message is due, in Unix milliseconds, from opts.delay or opts.at.
local function due_of(opts, now)
  if opts == nil then return now end
  if type(opts) ~= "table" then bad("options must be a table, got " .. type(opts)) end
  for k in next, opts do
    if k ~= "delay" and k ~= "at" then bad("unknown option " .. format("%q", tostring(k))) end
  end
  local delay, at = opts.delay, opts.at
  if delay ~= nil and at ~= nil then bad("give delay or at, not both") end
  if delay ~= nil then
    if type(delay) ~= "number" or not (delay >= 0) or delay > 1e10 then
      bad("delay must be a number of seconds, 0 or more")
    end
    return now + floor(delay * 1000)
  end
  if at ~= nil then
    if type(at) ~= "number" or not (at >= 0) or at > 1e11 then
      bad("at must be a time in Unix seconds")
    end
    return floor(at * 1000)
  end
  return now
end

-- mp.send(target, method, params [, opts]) -> the message's id. The message is a write of
-- the running call: it is sent once the call has committed, never for an attempt that did
-- not (lua/outbox.c).
function M.send(target, method, params, opts)
  local rec = current()
  if rec == nil then error("mp.send is only available inside a service handler", 2) end
  target = check_target(target)
  if type(method) ~= "string" or method == "" or #method > MAX_METHOD then
    bad("method must be a string of 1 to " .. MAX_METHOD .. " bytes")
  end
  local p
  if params ~= nil then
    if type(params) ~= "table" then bad("params must be a table (an array or an object)") end
    p = encode(params, "params")
  end
  local now = O.now()
  local due = due_of(opts, now)
  local id = O.new_id(HOME)
  local box = open_scope(rec, pending_scope(HOME), "outbox")
  box[id] = {t = target, m = method, p = p, u = rec.user, at = due, due = due, n = 0}
  O.kick(HOME, due) -- look at the bucket again once this call has had time to commit
  return id
end

-- The bucket an id names ("BB." ..., two hex digits), or nil for a string that is no id.
local function bucket_of(id)
  if type(id) ~= "string" then return nil end
  local b = tonumber(sub(id, 1, 2), 16)
  if b == nil or sub(id, 3, 3) ~= "." or b >= BUCKETS then return nil end
  return b
end

-- mp.cancel(id) -> true when the message was pending (it is removed with this call's
-- writes), false when it is unknown, delivered already, or dead.
function M.cancel(id)
  local rec = current()
  if rec == nil then error("mp.cancel is only available inside a service handler", 2) end
  if type(id) ~= "string" then error("mp.cancel: id must be a string", 2) end
  local b = bucket_of(id)
  if b == nil then return false end
  local box = open_scope(rec, pending_scope(b), "outbox")
  if box[id] == nil then return false end
  box[id] = nil
  return true
end

-- ---- What the delivery loop runs (lua/outbox.c), each a transaction of its own ----

local ops = {}

-- claim(b, now, token, limit, home, grace, lease) -> {msgs, pending, next}: takes up to
-- `limit` messages of bucket b that are due and not leased (a foreign bucket's only `grace`
-- ms after that: its own process comes first), marking them leased by `token` until now +
-- lease; `pending` counts the bucket's messages, `next` is when the next one not taken is
-- ready (nil: none).
function ops.claim(b, now, token, limit, home, grace, lease)
  local box = open_scope(current(), pending_scope(b), "outbox")
  local out, count, nxt = {}, 0, nil
  for id, m in next, box do
    count = count + 1
    local ready = m.due
    if m.lease and m.lease > ready then ready = m.lease end
    if not home then ready = ready + grace end
    if ready <= now and #out < limit then
      m.lease, m.by = now + lease, token -- m is this transaction's copy: a write of it
      out[#out + 1] = {id = id, t = m.t, m = m.m, p = m.p, u = m.u, n = m.n}
    elseif ready > now and (nxt == nil or ready < nxt) then
      nxt = ready
    end
  end
  return {msgs = array(out), pending = count, next = nxt}
end

-- deliver(b, id, token, method, params): an mp.self message, delivered exactly once. The
-- handler runs first (it may wait, e.g. in mp.fetch, before the outbox scope is read: a
-- read before a wait would void the attempt whenever another send changed the bucket); then
-- the message is removed in the same transaction, so the handler's writes and the removal
-- commit together or not at all. A message gone or taken by another deliverer (its lease ran
-- out) voids this delivery: O.SKIP, and nothing commits.
function ops.deliver(b, id, token, method, params)
  local rec = current()
  local svc = services[method]
  if type(svc) ~= "table" or type(svc.handler) ~= "function" or method == "rpc.discover" then
    raise(-32601, "Method not found", nil, 0)
  end
  local args, n = {}, 0
  if params ~= nil then
    args = decode(params)
    if sub(params, 1, 1) == "[" then n = #args else args, n = {args}, 1 end
  end
  local results = {svc.handler(unpack(args, 1, n))}
  -- A router (mp.shard, mp.scatter) forwarded the call: its target committed on its own, so
  -- such a message is delivered at least once, not exactly once (docs/outbox.md).
  rec.routing = nil
  local box = open_scope(rec, pending_scope(b), "outbox")
  local m = box[id]
  if m == nil or m.by ~= token then raise(O.SKIP, O.SKIP_MESSAGE, nil, 0) end
  box[id] = nil
  return results[1]
end

-- done(b, id): a final answer came: the message goes. -> whether it was still there.
function ops.done(b, id)
  local box = open_scope(current(), pending_scope(b), "outbox")
  if box[id] == nil then return false end
  box[id] = nil
  return true
end

-- retry(b, id, token, why, now, expiry, backoff_max) -> "retry" (due again after a backoff
-- of 1 s doubling up to backoff_max ms), "dead" (past `expiry` ms since it was first due:
-- moved to the dead list), or "gone" (removed, or another deliverer holds it now).
function ops.retry(b, id, token, why, now, expiry, backoff_max)
  local rec = current()
  local box = open_scope(rec, pending_scope(b), "outbox")
  local m = box[id]
  if m == nil or m.by ~= token then return "gone" end
  m.n, m.err, m.lease, m.by = m.n + 1, why, nil, nil
  if now - m.at >= expiry then
    box[id] = nil
    m.died = now
    open_scope(rec, dead_scope(b), "outbox (dead)")[id] = m
    return "dead"
  end
  local backoff = 1000 * 2 ^ (m.n - 1)
  if backoff > backoff_max then backoff = backoff_max end
  m.due = now + backoff
  return "retry"
end

-- As services are: setup_attempt (lua/txn.c) finds an internal call's handler here.
local internal = {}
for name, fn in next, ops do internal[name] = {name = name, handler = fn, expose = true} end
I.outbox_services = internal
