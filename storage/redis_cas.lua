-- redis_cas.lua: the compare-and-set of one or more scopes, run by the Redis server as one
-- atomic script (storage/redis.c sends it with EVALSHA, or EVAL after a NOSCRIPT reply). It is
-- embedded in the binary at build time (lua/embed.cmake) and runs inside Redis, not in
-- mphost's Lua state. All the scopes' versions are checked before anything is written, so a
-- transaction over several scopes is applied whole or not at all.
--
-- KEYS, five per scope S under prefix P (the hash tag {S} puts one scope's keys in one Cluster
-- slot; a commit of several scopes needs them in one slot, or one node):
--   1 P{S}:v        the version, a decimal string (absent = 0)
--   2 P{S}:d        hash: top-level key -> JSON text
--   3 P{S}:log      the change log, newest first: one record per commit,
--                   "VERSION\n" then per key "KLEN:KEY" "VLEN:VALUE" (VLEN 0 = deleted)
--   4 P{S}:claim    a fairness claim: the id of the committer whose turn it is, expiring
--   5 P{S}:logsize  the sum of the log's record lengths, in bytes
-- ARGV:
--   1 the log's byte budget       2 the log's record limit
--   3 the committer's id          4 claim milliseconds ("0": do not claim on a conflict)
--   then per scope, in KEYS order: its expected version, the number N of its writes, then N
--   key, value pairs: the value's JSON text, or "" to delete the key. A scope with N = 0 is
--   only checked (the transaction read it): it keeps its version and logs nothing.
--
-- Replies (storage/redis.c read_commit_reply checks every part of these shapes):
--   {1, NEW...}                          committed; per scope its new version (a string): the
--                                        expected version + 1, or the same when N = 0
--   {0, then per scope CUR, IS_DELTA, RECORDS or HGETALL, HELD}
--                                        refused; for a scope that moved, RECORDS are the log
--                                        records of versions expected+1 .. CUR, newest first
--                                        (IS_DELTA 1; empty when CUR is the expected version
--                                        and another committer's claim holds), or the whole
--                                        document as flat key/value pairs (IS_DELTA 0) when the
--                                        caller is further behind than the log reaches; for a
--                                        scope that held: CUR = expected, 1, {}, 0
-- CUR is a decimal string; HELD is 0, or, when another committer's claim refused the commit,
-- the milliseconds left of that claim (at least 1): the caller waits that long, not a guess.
--
-- A claim is a turn: the claimant's commits land, anyone else's are held, until it expires.
-- It is not released by the claimant's first commit, because two processes committing one hot
-- scope back to back conflict on nearly every other commit, and each conflict re-runs a whole
-- batch of handlers; in turns, each commits alone for a while and runs its handlers once.
--
-- Why the log is bounded by bytes: it exists so that a conflict costs what changed, not the
-- scope. Bounded only by a record count, a scope of big values would keep that many copies of
-- them. With a byte budget the oldest records go first; a caller further behind than the log
-- reaches gets the whole document instead, which is never larger than what it replaces.

local log_bytes, log_records = tonumber(ARGV[1]), tonumber(ARGV[2])
local committer, claim_ms = ARGV[3], tonumber(ARGV[4])
local BATCH = 1000 -- keys per HSET/HDEL call (unpack has a stack limit)

local call, concat, tostring, unpack = redis.call, table.concat, tostring, unpack

-- Each scope's keys, expected version and where its pairs are in ARGV.
local scopes, at = {}, 5
for i = 1, #KEYS / 5 do
  local k = 5 * (i - 1)
  local n = tonumber(ARGV[at + 1])
  scopes[i] = {version_key = KEYS[k + 1], data_key = KEYS[k + 2], log_key = KEYS[k + 3],
               claim_key = KEYS[k + 4], logsize_key = KEYS[k + 5],
               expected = tonumber(ARGV[at]), first = at + 2, last = at + 1 + 2 * n}
  at = at + 2 + 2 * n
end

-- Check every scope first.
local refused = false
for _, s in ipairs(scopes) do
  s.cur = tonumber(call('GET', s.version_key) or '0')
  s.holder = call('GET', s.claim_key)
  s.held = 0
  if s.holder and s.holder ~= committer then
    s.held = call('PTTL', s.claim_key)
    if s.held < 1 then s.held = 1 end -- a claim set by hand without an expiry
  end
  if s.cur ~= s.expected or s.held > 0 then refused = true end
end

-- Refused: say, per scope, what changed since the caller's version.
if refused then
  local reply = {0}
  for _, s in ipairs(scopes) do
    local behind = s.cur - s.expected
    local moved = behind ~= 0 or s.held > 0
    if moved and s.held == 0 and claim_ms > 0 then
      call('SET', s.claim_key, committer, 'PX', claim_ms)
    end
    local part
    if behind == 0 then
      part = {tostring(s.cur), 1, {}, s.held}
    elseif behind > 0 and call('LLEN', s.log_key) >= behind then
      part = {tostring(s.cur), 1, call('LRANGE', s.log_key, 0, behind - 1), s.held}
    else
      part = {tostring(s.cur), 0, call('HGETALL', s.data_key), s.held}
    end
    for _, x in ipairs(part) do reply[#reply + 1] = x end
  end
  return reply
end

-- Apply one scope's writes, in batches, and log them.
local function apply(s)
  local new = s.cur + 1
  local rec, sets, dels = {tostring(new), '\n'}, {}, {}
  for i = s.first, s.last, 2 do
    local k, v = ARGV[i], ARGV[i + 1]
    if v == '' then dels[#dels + 1] = k else sets[#sets + 1] = k; sets[#sets + 1] = v end
    rec[#rec + 1] = #k .. ':' .. k .. #v .. ':' .. v
    if #sets >= 2 * BATCH then call('HSET', s.data_key, unpack(sets)); sets = {} end
    if #dels >= BATCH then call('HDEL', s.data_key, unpack(dels)); dels = {} end
  end
  if #sets > 0 then call('HSET', s.data_key, unpack(sets)) end
  if #dels > 0 then call('HDEL', s.data_key, unpack(dels)) end
  call('SET', s.version_key, tostring(new))
  local log_key, logsize_key = s.log_key, s.logsize_key
  -- Log the commit, then drop the oldest records until the log fits its budget. A record
  -- larger than the whole budget empties the log: every caller behind needs it, so the rest
  -- is useless.
  local record = concat(rec)
  if #record > log_bytes then
    call('DEL', log_key, logsize_key)
  else
    local n = call('LPUSH', log_key, record)
    -- A log that was empty (new, or deleted by hand) restarts the count. A log without a
    -- size was written before sizes were kept (mphost 0.1): its size is unknown, so it keeps
    -- only this record (callers further behind get the whole document, as for a trimmed log).
    local size = #record
    if n > 1 then
      local known = call('GET', logsize_key)
      if known then
        size = size + tonumber(known)
      else
        call('LTRIM', log_key, 0, 0)
        n = 1
      end
    end
    while n > 1 and (size > log_bytes or n > log_records) do
      size = size - #call('RPOP', log_key)
      n = n - 1
    end
    call('SET', logsize_key, tostring(size))
  end
  return new
end

local reply = {1}
for i, s in ipairs(scopes) do
  if s.last >= s.first then
    reply[i + 1] = tostring(apply(s))
  else
    reply[i + 1] = tostring(s.cur) -- only checked
  end
end
return reply
