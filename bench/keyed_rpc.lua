-- keyed_rpc.lua: wrk script that POSTs one JSON-RPC call per request, each with an
-- Idempotency-Key of its own when KEYED=1 (a prefix unique to the run and thread, then a
-- counter). METHOD: incr (default) or deposit, whose account is the counter modulo ACCOUNTS
-- (default 64). A reply that is not a result counts as an error (a replay would still be one:
-- bench/idempotency.sh reads mphost_idempotent_replays_total, which must stay 0).
local method = os.getenv("METHOD") or "incr"
local keyed = os.getenv("KEYED") == "1"
local accounts = tonumber(os.getenv("ACCOUNTS") or "64")
local n = 0
local prefix = string.format("%d-%s-", os.time(), tostring({}):match("0x%x+") or "t")

function request()
  n = n + 1
  local params = method == "deposit" and string.format('{"id":%d}', n % accounts) or "[]"
  local headers = {["Content-Type"] = "application/json"}
  if keyed then headers["Idempotency-Key"] = prefix .. n end
  return wrk.format("POST", "/", headers,
    '{"jsonrpc":"2.0","id":1,"method":"' .. method .. '","params":' .. params .. '}')
end

local errors = 0
function response(status, headers, body)
  if status ~= 200 or not body:find('"result"', 1, true) then
    errors = errors + 1
    if errors <= 3 then io.stderr:write("bad response: ", status, " ", body, "\n") end
  end
end

function done(summary, latency, requests)
  io.write(string.format("RESULT rps=%.0f p50_us=%d p99_us=%d requests=%d errors=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50),
    latency:percentile(99), summary.requests, summary.errors.status + summary.errors.read +
    summary.errors.write + summary.errors.timeout + summary.errors.connect))
end
