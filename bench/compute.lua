-- compute.lua: a compute-heavy handler for bench/workers.sh (LuaJIT's compiler on versus
-- off): a million iterations of arithmetic and table work per call.
local mp = require("metaparticle")

mp.service("compute", function()
  local t, acc = {}, 0
  for i = 1, 1000000 do
    local k = i % 1000 + 1
    t[k] = (t[k] or 0) + i * 0.5
    acc = acc + t[k] % 7
  end
  return math.floor(acc)
end).expose = true

mp.serve()
