-- GET /items/{id} with every request a new id (cold cache: each one a miss + fill).
-- Thread t of BENCH_THREADS takes ids BENCH_START + t, + 2t, ... (stride = thread count),
-- so no id is asked twice across threads. Past BENCH_N it wraps (only in tiny smoke runs).
dofile(os.getenv("BENCH_LUA") .. "/report.lua")

local threads = tonumber(os.getenv("BENCH_THREADS") or "1")
local start = tonumber(os.getenv("BENCH_START") or "1")
local next_id

function init(args)
  next_id = start + (tid or 0)
end

function request()
  local id = next_id
  next_id = next_id + threads
  if next_id > BENCH_N then
    next_id = 1 + (tid or 0)
  end
  return wrk.format("GET", "/items/" .. id)
end
