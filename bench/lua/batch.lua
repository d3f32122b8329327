-- GET /items?ids=... with BENCH_BATCH (100) distinct uniform ids in 1..BENCH_N.
dofile(os.getenv("BENCH_LUA") .. "/report.lua")

local size = tonumber(os.getenv("BENCH_BATCH") or "100")

function init(args)
  bench_seed()
end

function request()
  local seen, ids = {}, {}
  while #ids < size do
    local id = math.random(BENCH_N)
    if not seen[id] then
      seen[id] = true
      ids[#ids + 1] = id
    end
  end
  return wrk.format("GET", "/items?ids=" .. table.concat(ids, ","))
end
