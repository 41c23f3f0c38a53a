-- Chapter 4 of the Metaparticle walkthrough: scatter/gather, a histogram. mp.scatter(10,
-- leaf, merge) runs ten workers; each call runs leaf on all ten at once, each drawing 100
-- numbers from a normal distribution, and merge counts the thousand numbers into ten
-- buckets of width 0.5 from -2.5 to 2.5 (the 1% or so beyond those are left out). The
-- answer is the bucket array.
local mp = require("metaparticle")

-- Each worker draws its own numbers (LuaJIT's generator starts alike in every process).
math.randomseed(os.time() * 1000 + mp.worker.pid)

-- A standard normal number from two uniform ones (the Box-Muller transform).
local function gaussian()
  local u = 1 - math.random() -- in (0, 1]: log(0) is not a number
  return math.sqrt(-2 * math.log(u)) * math.cos(2 * math.pi * math.random())
end

local function leaf()
  local numbers = {}
  for i = 1, 100 do numbers[i] = gaussian() end
  return numbers
end

local function merge(results)
  local buckets = {}
  for b = 1, 10 do buckets[b] = 0 end
  for _, numbers in ipairs(results) do
    for _, x in ipairs(numbers) do
      local b = math.floor((x + 2.5) / 0.5) + 1
      if b >= 1 and b <= 10 then buckets[b] = buckets[b] + 1 end
    end
  end
  return buckets
end

local svc = mp.service("histogram-service", mp.scatter(10, leaf, merge))
svc.subservices.gather.expose = true -- the original's spelling of svc.expose = true

mp.serve()
