local mp = require("metaparticle")
mp.service("x", function() return 1 end
