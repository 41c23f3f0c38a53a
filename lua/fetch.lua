-- fetch.lua: the Lua half of mp.fetch and mp.rpc (lua/fetch.c has the C half and the why).
--
-- lua/fetch.c runs this chunk once per state, after metaparticle.lua, with its C helpers `F`,
-- the public module `M` (to which it adds fetch and rpc) and the internal table `I`. Options
-- are checked here, into plain arguments for F.start; F.start starts the exchange and yields
-- the handler's coroutine; the host resumes it when the exchange has ended, and F.result
-- reads the outcome. A handler that had read a scope before the wait is run again when that
-- scope changed meanwhile (F.void; lua/fetch.c, "Reads across a wait").

local F, M, I = ...

local type, pairs, ipairs, tostring, pcall, error = type, pairs, ipairs, tostring, pcall, error
local setmetatable = setmetatable
local floor, huge = math.floor, math.huge
local upper, lower, format = string.upper, string.lower, string.format
local isyieldable = coroutine.isyieldable

local error_mt, encode, decode = I.error_mt, I.encode, I.decode
local OUTBOUND_FAILED = F.OUTBOUND_FAILED
local NOMEM = "not enough memory"

local DEFAULT_TIMEOUT = 10               -- seconds, the whole exchange
local DEFAULT_MAX_BODY = 16 * 1024 * 1024 -- bytes of a response body

-- ---- Options ----

local function bad(what, message)
  error(what .. ": " .. message, 3)
end

-- The options a function takes, by name (anything else is a mistake worth hearing about).
local FETCH_OPTIONS = {method = true, headers = true, body = true, timeout = true, cafile = true,
  max_body = true}
local RPC_OPTIONS = {headers = true, timeout = true, cafile = true, max_body = true}

-- Checks opts against `allowed`; returns the headers as a flat list {name, value, ...} (values
-- as strings), the set of their names in lower case, and the other options, checked.
local function read_options(what, opts, allowed)
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then bad(what, "options must be a table, got " .. type(opts)) end
  for k in pairs(opts) do
    if not allowed[k] then bad(what, "unknown option " .. format("%q", tostring(k))) end
  end
  local list, names = {}, {}
  local headers = opts.headers
  if headers ~= nil then
    if type(headers) ~= "table" then bad(what, "headers must be a table of name = value") end
    for name, value in pairs(headers) do
      if type(name) ~= "string" then bad(what, "a header name must be a string") end
      if type(value) == "number" then value = tostring(value) end
      if type(value) ~= "string" then
        bad(what, "header " .. name .. ": its value must be a string or a number")
      end
      list[#list + 1] = name
      list[#list + 1] = value
      names[lower(name)] = true
    end
  end
  local timeout = opts.timeout
  if timeout == nil then timeout = DEFAULT_TIMEOUT end
  if type(timeout) ~= "number" or not (timeout > 0) or timeout > 86400 then
    bad(what, "timeout must be a number of seconds above 0 (at most 86400)")
  end
  local cafile = opts.cafile
  if cafile ~= nil and type(cafile) ~= "string" then bad(what, "cafile must be a file name") end
  local max_body = opts.max_body
  if max_body == nil then max_body = DEFAULT_MAX_BODY end
  if type(max_body) ~= "number" or max_body < 0 or max_body ~= floor(max_body) or
      max_body == huge then
    bad(what, "max_body must be a whole number of bytes")
  end
  -- At least a millisecond: a shorter timeout would be none at all to the exchange.
  local timeout_ms = floor(timeout * 1000)
  if timeout_ms < 1 then timeout_ms = 1 end
  return list, names, timeout_ms, cafile, max_body
end

-- ---- The exchange ----

-- Runs one exchange from the handler's coroutine; returns the response table, or nil and why.
local function exchange(what, url, method, list, body, timeout_ms, cafile, max_body)
  local rec = F.current(what)
  local before = I.stamp(rec)
  local why = F.start(what, isyieldable(), url, method, list, body, timeout_ms, cafile, max_body)
  if why then return nil, why end -- it did not start (the host is stopping): no wait
  local res, err = F.result()
  if I.stamp(rec) ~= before then F.void(what) end -- raises: the call runs again
  return res, err
end

-- mp.fetch(url [, opts]) -> res, or nil and a message (no HTTP response).
function M.fetch(url, opts)
  if type(url) ~= "string" then bad("mp.fetch", "url must be a string, got " .. type(url)) end
  local list, names, timeout_ms, cafile, max_body = read_options("mp.fetch", opts,
    FETCH_OPTIONS)
  local body = opts and opts.body
  if type(body) == "table" then
    body = encode(body, "body")
    if not names["content-type"] then
      list[#list + 1] = "Content-Type"
      list[#list + 1] = "application/json"
    end
  elseif body ~= nil and type(body) ~= "string" then
    bad("mp.fetch", "body must be a string or a table (sent as JSON), got " .. type(body))
  end
  local method = opts and opts.method
  if method == nil then
    method = body and "POST" or "GET"
  elseif type(method) ~= "string" then
    bad("mp.fetch", "method must be a string")
  end
  return exchange("mp.fetch", url, upper(method), list, body, timeout_ms, cafile, max_body)
end

-- ---- mp.rpc ----

-- The error mp.rpc returns when no JSON-RPC response came back.
local function failed(why)
  return setmetatable({code = OUTBOUND_FAILED, message = "outbound call failed: " .. why},
    error_mt)
end

local function valid_code(code)
  return type(code) == "number" and code == floor(code) and code >= -2147483648 and
    code <= 2147483647 and code ~= 0
end

-- What a JSON-RPC response body says: result, or nil and the error object.
local function read_response(res)
  local ok, doc = pcall(decode, res.body)
  if not ok then
    if doc == NOMEM then error(doc, 0) end
    return nil, failed(format("HTTP %d, and the body is not JSON", res.status))
  end
  if type(doc) ~= "table" or doc.jsonrpc ~= "2.0" or (doc.result == nil) == (doc.error == nil) then
    return nil, failed(format("HTTP %d, and the body is not a JSON-RPC response", res.status))
  end
  -- An error the server could not tie to a request (it could not read it) has id null
  -- (JSON-RPC 2.0, section 5): it is still the answer to ours.
  local untied = doc.error ~= nil and (doc.id == nil or doc.id == M.null)
  if doc.id ~= 1 and not untied then
    return nil, failed("the response's id is not the request's")
  end
  local e = doc.error
  if e == nil then return doc.result end
  if type(e) ~= "table" or not valid_code(e.code) or type(e.message) ~= "string" then
    return nil, failed("the response's error object is malformed")
  end
  return nil, setmetatable({code = e.code, message = e.message, data = e.data}, error_mt)
end

-- mp.rpc(url, method [, params [, opts]]) -> result, or nil and an error object.
function M.rpc(url, method, params, opts)
  if type(url) ~= "string" then bad("mp.rpc", "url must be a string, got " .. type(url)) end
  if type(method) ~= "string" then
    bad("mp.rpc", "method must be a string, got " .. type(method))
  end
  local list, names, timeout_ms, cafile, max_body = read_options("mp.rpc", opts, RPC_OPTIONS)
  local body = '{"jsonrpc":"2.0","id":1,"method":' .. encode(method, "method")
  if params ~= nil then body = body .. ',"params":' .. encode(params, "params") end
  body = body .. "}"
  for _, name in ipairs({"Content-Type", "Accept"}) do
    if not names[lower(name)] then
      list[#list + 1] = name
      list[#list + 1] = "application/json"
    end
  end
  local res, err = exchange("mp.rpc", url, "POST", list, body, timeout_ms, cafile, max_body)
  if res == nil then return nil, failed(err) end
  return read_response(res)
end
