-- bad_spread.lua: mp.spread with a count it must refuse (MPH_TEST_SPREAD_N).
local mp = require("metaparticle")
local n = os.getenv("MPH_TEST_SPREAD_N")
mp.service("s", mp.spread(tonumber(n) or n, function() return 1 end))
mp.serve()
