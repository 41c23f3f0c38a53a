-- ops.lua: services for the operations endpoints (spec/test_ops.py): one that commits a
-- write, one that fails, one not exposed, one reporting its worker.
local mp = require("metaparticle")

local add = mp.service("add", function(n)
  local g = mp.scope.global
  g.total = (g.total or 0) + n
  return { total = g.total, worker = mp.worker.id }
end)
add.expose = true
add.description = "adds n to the global total"
add.params = { { name = "n", schema = { type = "number" } } }
add.result = { name = "sum", schema = { type = "object" } }

mp.service("fail", function()
  error("failing on purpose")
end).expose = true

mp.service("hidden", function() return 1 end)

mp.service("whoami", function() return mp.worker.id end).expose = true

mp.serve()
