-- transfer.lua: wrk script for spec/scripts/accounts.lua-style services (bench/scopes.sh).
-- MODE (env): "transfer" moves 1 between two random accounts of 1..ACCOUNTS; "count" counts
-- in a random named scope of 1..ACCOUNTS (ACCOUNTS=1: one hot scope). AUTH (env, optional):
-- "user:password", sent as HTTP Basic credentials.
dofile("bench/rpc.lua") -- its done(): the RESULT line bench/lib.sh reads (wrk runs from the repo root)

local mode = os.getenv("MODE") or "transfer"
local accounts = tonumber(os.getenv("ACCOUNTS") or "10000")
local method = os.getenv("METHOD")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("AUTH")
if auth and auth ~= "" then
  -- base64 by hand: wrk's Lua has no library for it
  local chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  local out, bytes = {}, {auth:byte(1, -1)}
  for i = 1, #bytes, 3 do
    local a, b, c = bytes[i], bytes[i + 1], bytes[i + 2]
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    for k = 3, 0, -1 do
      local idx = math.floor(n / 64 ^ k) % 64 + 1
      out[#out + 1] = chars:sub(idx, idx)
    end
    if not b then out[#out - 1], out[#out] = "=", "=" elseif not c then out[#out] = "=" end
  end
  wrk.headers["Authorization"] = "Basic " .. table.concat(out)
end

function setup(thread)
  thread:set("seed", math.random(1, 1e9))
end

function init()
  math.randomseed(seed or os.time())
end

function request()
  local body
  if mode == "transfer" then
    local a = math.random(1, accounts)
    local b = math.random(1, accounts - 1)
    if b >= a then b = b + 1 end
    body = string.format('{"jsonrpc":"2.0","id":1,"method":"transfer","params":{"from":%d,"to":%d,"amount":1}}', a, b)
  elseif mode == "count" then
    body = string.format('{"jsonrpc":"2.0","id":1,"method":"count","params":{"name":"c%d"}}', math.random(1, accounts))
  else -- a fixed call
    body = '{"jsonrpc":"2.0","id":1,"method":"' .. method .. '","params":[{}]}'
  end
  return wrk.format(nil, nil, nil, body)
end

local errors = 0
function response(status, headers, body)
  if status ~= 200 or (not body:find('"result"', 1, true) and not body:find('-32010', 1, true)) then
    errors = errors + 1
    if errors <= 3 then io.stderr:write("bad response: ", status, " ", body, "\n") end
  end
end
