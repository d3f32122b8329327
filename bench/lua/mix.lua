-- 95 % GET /items/{id}, 5 % PATCH /items/{id} {"price_cents": n}, ids uniform in 1..BENCH_N.
-- Every PATCH invalidates its id, so the next read of it is a miss. WRITE_TOKEN is unset in
-- the bench, so writes need no Authorization header.
dofile(os.getenv("BENCH_LUA") .. "/report.lua")

local write_pct = tonumber(os.getenv("BENCH_WRITE_PCT") or "5")
local json = { ["Content-Type"] = "application/json" }

function init(args)
  bench_seed()
end

function request()
  local id = math.random(BENCH_N)
  if math.random() * 100 < write_pct then
    return wrk.format("PATCH", "/items/" .. id, json,
      '{"price_cents": ' .. math.random(100, 1000000) .. '}')
  end
  return wrk.format("GET", "/items/" .. id)
end
