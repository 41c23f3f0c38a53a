-- rpc.lua: wrk script that POSTs one JSON-RPC call per request.
-- METHOD and PARAMS come from the environment (defaults: simple-service, [{"hello":"world"}]).
local method = os.getenv("METHOD") or "simple-service"
local params = os.getenv("PARAMS") or '[{"hello":"world"}]'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"jsonrpc":"2.0","id":1,"method":"' .. method .. '","params":' .. params .. '}'

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
