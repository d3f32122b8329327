-- GET /items/{id}, id uniform in 1..BENCH_N: the hit path once every id is cached, the
-- miss path with CACHE_ENABLED=false.
dofile(os.getenv("BENCH_LUA") .. "/report.lua")

function init(args)
  bench_seed()
end

function request()
  return wrk.format("GET", "/items/" .. math.random(BENCH_N))
end
