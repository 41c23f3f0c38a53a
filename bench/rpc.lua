-- rpc.lua: wrk script that POSTs JSON-RPC calls, one request after another.
-- From the environment: METHOD and PARAMS (defaults: simple-service, [{"hello":"world"}]);
-- BATCH=N sends a batch of N calls per request (ids 1..N) instead of one call; PAD=BYTES
-- replaces PARAMS with [{"hello":"<BYTES x's>"}] (large params); CLOSE=1 sends
-- "Connection: close", so every request opens a new connection. Requests made one by one
-- (with KEYED set, 0 or 1, so that both cases cost wrk the same): KEYED=1 gives each its own
-- Idempotency-Key (a prefix unique to the run and thread, then a counter); SPREAD=N makes
-- PARAMS {"id": <the counter modulo N>} (a deposit into one of N accounts).
local method = os.getenv("METHOD") or "simple-service"
local params = os.getenv("PARAMS") or '[{"hello":"world"}]'
local pad = tonumber(os.getenv("PAD") or "")
if pad then params = '[{"hello":"' .. string.rep("x", pad) .. '"}]' end
local batch = tonumber(os.getenv("BATCH") or "")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if os.getenv("CLOSE") == "1" then wrk.headers["Connection"] = "close" end

local function call(id)
  return '{"jsonrpc":"2.0","id":' .. id .. ',"method":"' .. method .. '","params":' .. params .. '}'
end
if batch then
  local calls = {}
  for i = 1, batch do calls[i] = call(i) end
  wrk.body = "[" .. table.concat(calls, ",") .. "]"
else
  wrk.body = call(1)
end

local keyed, accounts = os.getenv("KEYED"), tonumber(os.getenv("SPREAD") or "")
if keyed or accounts then
  local n = 0
  local prefix = string.format("%d-%s-", os.time(), tostring({}):match("0x%x+") or "t")
  function request()
    n = n + 1
    if accounts then params = string.format('{"id":%d}', n % accounts) end
    local headers = {["Content-Type"] = "application/json"}
    if keyed == "1" then headers["Idempotency-Key"] = prefix .. n end
    return wrk.format("POST", "/", headers, call(1))
  end
end

-- Every answer must be a result: a batch's last call's result is at the end of the answer.
local errors = 0
function response(status, headers, body)
  if status ~= 200 or not body:find('"result"', 1, true) or body:find('"error"', 1, true) then
    errors = errors + 1
    if errors <= 3 then io.stderr:write("bad response: ", status, " ", body:sub(1, 300), "\n") end
  end
end

function done(summary, latency, requests)
  io.write(string.format("RESULT rps=%.0f p50_us=%d p99_us=%d requests=%d errors=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50),
    latency:percentile(99), summary.requests, summary.errors.status + summary.errors.read +
    summary.errors.write + summary.errors.timeout + summary.errors.connect))
end
