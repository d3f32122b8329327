-- zipf.lua's requests (Zipf(BENCH_ZIPF_S) over BENCH_N ids) at a constant rate: BENCH_RATE
-- requests/s over all threads, whatever the latency (the refresh scenario counts misses per
-- second, and a closed loop would slow down exactly when a miss storm hits). Each thread
-- hands out send times BENCH_THREADS/BENCH_RATE s apart to its connections through wrk's
-- delay(); a connection still busy at its slot sends late (a backlog of at most 1 s is
-- caught up, older slots are dropped), so the connections must outnumber the requests in
-- flight.
dofile(os.getenv("BENCH_LUA") .. "/zipf.lua")

local ffi = require("ffi")
ffi.cdef([[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]])
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local interval = 1000 * tonumber(os.getenv("BENCH_THREADS") or "1") / tonumber(os.getenv("BENCH_RATE") or "1000")
local next_at

function delay()
  local now = now_ms()
  if not next_at or next_at < now - 1000 then
    next_at = now
  end
  local slot = next_at
  next_at = next_at + interval
  return math.max(0, slot - now)
end
