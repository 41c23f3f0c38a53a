-- counter.lua: a wrk script for the tests: POSTs simple-storage calls over keep-alive and, at
-- the end, prints "CALLS ok=N bad=M": calls answered with a result and calls answered with
-- anything else (the first three of those go to stderr).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"jsonrpc":"2.0","id":1,"method":"simple-storage","params":[{}]}'

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init()
  ok, bad = 0, 0
end

function response(status, headers, body)
  if status == 200 and body:find('"result"', 1, true) then
    ok = ok + 1
  else
    bad = bad + 1
    if bad <= 3 then io.stderr:write("bad response: ", status, " ", body, "\n") end
  end
end

function done()
  local good, failed = 0, 0
  for _, t in ipairs(threads) do
    good, failed = good + t:get("ok"), failed + t:get("bad")
  end
  io.write(string.format("CALLS ok=%d bad=%d\n", good, failed))
end
