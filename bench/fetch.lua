-- fetch.lua: the services bench/fetch.sh measures. "plain" answers at once; "fetched" first
-- sends the echo call to ECHO_URL (another server, bench/fetch.sh starts it) with mp.fetch and
-- answers once that has answered: the difference is what one outbound call costs.
local mp = require("metaparticle")

local URL = os.getenv("ECHO_URL") or "http://127.0.0.1:3001/"
local BODY = '{"jsonrpc":"2.0","id":1,"method":"simple-service","params":[{"hello":"world"}]}'
local OPTS = { body = BODY, headers = { ["Content-Type"] = "application/json" } }

mp.service("plain", function(request)
  return { ["request-was"] = request }
end).expose = true

mp.service("fetched", function(request)
  local res, err = mp.fetch(URL, OPTS)
  if not res then error(err) end
  if res.status ~= 200 then error("echo answered " .. res.status) end
  return { ["request-was"] = request, bytes = #res.body }
end).expose = true

mp.serve()
