-- redis_cas.lua: the compare-and-set of one scope, run by the Redis server as one atomic script
-- (storage/redis.c sends it with EVALSHA, or EVAL after a NOSCRIPT reply). It is embedded in the
-- binary at build time (lua/embed.cmake) and runs inside Redis, not in mphost's Lua state.
--
-- KEYS (one scope S under prefix P; the hash tag {S} puts them in one Cluster slot):
--   1 P{S}:v        the version, a decimal string (absent = 0)
--   2 P{S}:d        hash: top-level key -> JSON text
--   3 P{S}:log      the change log, newest first: one record per commit,
--                   "VERSION\n" then per key "KLEN:KEY" "VLEN:VALUE" (VLEN 0 = deleted)
--   4 P{S}:claim    a fairness claim: the id of the committer owed the next commit
--   5 P{S}:logsize  the sum of the log's record lengths, in bytes
-- ARGV:
--   1 the expected version        2 the log's byte budget      3 the log's record limit
--   4 the committer's id          5 claim milliseconds ("0": do not claim on a conflict)
--   6.. key, value pairs: the value's JSON text, or "" to delete the key
--
-- Replies (storage/redis.c read_commit_reply checks every part of these shapes):
--   {1, NEW}                             committed; NEW (a string) = the expected version + 1
--   {0, CUR, 1, RECORDS, HELD}           conflict; RECORDS are the log records of versions
--                                        expected+1 .. CUR, newest first (empty when CUR is the
--                                        expected version and another committer's claim holds)
--   {0, CUR, 0, HGETALL, HELD}           conflict; the caller is further behind than the log
--                                        reaches: the whole document, as flat key/value pairs
-- CUR is a decimal string, HELD is 1 when another committer's claim refused the commit.
--
-- Why the log is bounded by bytes: it exists so that a conflict costs what changed, not the
-- scope. Bounded only by a record count, a scope of big values would keep that many copies of
-- them. With a byte budget the oldest records go first; a caller further behind than the log
-- reaches gets the whole document instead, which is never larger than what it replaces.

local version_key, data_key, log_key, claim_key, logsize_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local expected = tonumber(ARGV[1])
local log_bytes, log_records = tonumber(ARGV[2]), tonumber(ARGV[3])
local committer, claim_ms = ARGV[4], tonumber(ARGV[5])
local FIRST_PAIR = 6
local BATCH = 1000 -- keys per HSET/HDEL call (unpack has a stack limit)

local call, concat, tostring, unpack = redis.call, table.concat, tostring, unpack

local cur = tonumber(call('GET', version_key) or '0')
local holder = call('GET', claim_key)
local held = 0
if holder and holder ~= committer then held = 1 end

-- Refused: say what changed since the caller's version.
if cur ~= expected or held == 1 then
  if held == 0 and claim_ms > 0 then
    call('SET', claim_key, committer, 'PX', claim_ms)
  end
  local behind = cur - expected
  if behind == 0 then return {0, tostring(cur), 1, {}, held} end
  if behind > 0 and call('LLEN', log_key) >= behind then
    return {0, tostring(cur), 1, call('LRANGE', log_key, 0, behind - 1), held}
  end
  return {0, tostring(cur), 0, call('HGETALL', data_key), held}
end

-- Apply the writes, in batches.
local new = cur + 1
local rec, sets, dels = {tostring(new), '\n'}, {}, {}
for i = FIRST_PAIR, #ARGV, 2 do
  local k, v = ARGV[i], ARGV[i + 1]
  if v == '' then dels[#dels + 1] = k else sets[#sets + 1] = k; sets[#sets + 1] = v end
  rec[#rec + 1] = #k .. ':' .. k .. #v .. ':' .. v
  if #sets >= 2 * BATCH then call('HSET', data_key, unpack(sets)); sets = {} end
  if #dels >= BATCH then call('HDEL', data_key, unpack(dels)); dels = {} end
end
if #sets > 0 then call('HSET', data_key, unpack(sets)) end
if #dels > 0 then call('HDEL', data_key, unpack(dels)) end
call('SET', version_key, tostring(new))

-- Log the commit, then drop the oldest records until the log fits its budget. A record larger
-- than the whole budget empties the log: every caller behind needs it, so the rest is useless.
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
if holder then call('DEL', claim_key) end
return {1, tostring(new)}
