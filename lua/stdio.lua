-- stdio.lua: io.write, io.stdout, io.stderr and io.output() for scripts. A deployment's stdout
-- and stderr are its log, and Lua's own file handles write there raw: a handler writing what
-- a client sent could forge log lines. These write through the logger instead (C.log, which
-- escapes), as print does (lua/vm.c): a whole line per log entry, at info for stdout and warn
-- for stderr; a partial line waits for its newline, a flush, or MAX_PENDING bytes.
-- Run once by vm.c's init_state with (log, INFO, WARN); changes the io table in place.
local log, INFO, WARN = ...

local type, select, find, sub, format = type, select, string.find, string.sub, string.format
local concat, setmetatable = table.concat, setmetatable
local MAX_PENDING = 65536

local function log_stream(name, level)
  local pending = "" -- written, not logged yet: no newline came
  local stream = {}

  local function emit_lines()
    local at = 1 -- one pass: a big write of many lines is not copied once per line
    while true do
      local nl = find(pending, "\n", at, true)
      if nl == nil then break end
      log(level, sub(pending, at, nl - 1))
      at = nl + 1
    end
    pending = sub(pending, at)
    if #pending >= MAX_PENDING then
      log(level, pending)
      pending = ""
    end
  end

  function stream:write(...)
    local parts = {pending}
    for i = 1, select("#", ...) do
      local v = select(i, ...)
      local t = type(v)
      if t ~= "string" and t ~= "number" then
        error(format("bad argument #%d to 'write' (string expected, got %s)", i, t), 2)
      end
      parts[i + 1] = v
    end
    pending = concat(parts)
    emit_lines()
    return self
  end

  function stream:flush()
    if pending ~= "" then
      log(level, pending)
      pending = ""
    end
    return true
  end

  function stream:setvbuf() return true end
  function stream:close() return nil, "cannot close standard file" end
  function stream:seek() return nil, "Illegal seek", 29 end
  function stream:read() return nil, "Bad file descriptor", 9 end
  function stream:lines() error("the log cannot be read", 2) end

  return setmetatable(stream, {__tostring = function() return "file (" .. name .. ", the log)" end})
end

local stdout, stderr = log_stream("stdout", INFO), log_stream("stderr", WARN)
local lua_output = io.output
local current = stdout -- io.write's file: stdout until io.output(file) says otherwise

io.stdout, io.stderr = stdout, stderr

-- io.output([file or name]) -> the default output file, as Lua's, but stdout is the log's.
function io.output(file)
  if file == nil then return current end
  if file == stdout or file == stderr then
    current = file
  else
    current = lua_output(file)
  end
  return current
end

function io.write(...)
  return current:write(...)
end

-- io.close() closes the default output file, which Lua's would take to be the real stdout.
local lua_close = io.close
function io.close(file)
  if file == nil then file = current end
  if file == stdout or file == stderr then return file:close() end
  return lua_close(file)
end
