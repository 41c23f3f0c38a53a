-- big.lua: server5's counter in a scope that also holds many other keys (fill(n) adds them
-- in one transaction). Commit cost must not grow with the scope's size.
local mp = require("metaparticle")

mp.service("simple-storage", function(request)
  local g = mp.scope.global
  g.requests = (g.requests or 0) + 1
  return { requests = g.requests }
end).expose = true

mp.service("fill", function(n)
  local g = mp.scope.global
  for i = 1, n do g["key" .. i] = { index = i, name = "value " .. i } end
  return n
end).expose = true

mp.serve()
