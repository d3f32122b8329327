-- GET /items/{id} with ranks drawn from Zipf(BENCH_ZIPF_S) over BENCH_N ids (rank 1 is the
-- most popular). Ranks are spread over the id space by a bijection (rank-1) * P mod N + 1
-- with P prime and coprime to N, so hot ids are not neighbours in the table.
dofile(os.getenv("BENCH_LUA") .. "/report.lua")

local s = tonumber(os.getenv("BENCH_ZIPF_S") or "0.99")
local P = 999983
local cdf

function init(args)
  bench_seed()
  cdf = {}
  local sum = 0
  for i = 1, BENCH_N do
    sum = sum + i ^ (-s)
    cdf[i] = sum
  end
  for i = 1, BENCH_N do
    cdf[i] = cdf[i] / sum
  end
end

local function rank()
  local u = math.random()
  local lo, hi = 1, BENCH_N
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return lo
end

function request()
  local id = ((rank() - 1) * P) % BENCH_N + 1
  return wrk.format("GET", "/items/" .. id)
end
