-- Shared by every bench/lua script (loaded with dofile): wrk calls done() once at the end,
-- and it prints one line, "WRKJSON {...}", that bench/analyze.py reads. Latencies in µs.
-- errors.status counts responses that were not 2xx or 3xx.
function done(summary, latency, requests)
  local e = summary.errors
  local p = {}
  for _, q in ipairs({ 50, 75, 90, 99, 99.9 }) do
    p[#p + 1] = string.format('"%s": %d', tostring(q), latency:percentile(q))
  end
  io.write(string.format(
    'WRKJSON {"duration_us": %d, "requests": %d, "bytes": %d, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
      .. '"latency_us": {"mean": %.1f, "stdev": %.1f, "min": %d, "max": %d, "p": {%s}}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.min, latency.max, table.concat(p, ", ")))
end

-- Each wrk thread runs its own copy of the script; setup() runs in the main state once
-- per thread and hands each a number, so threads seed and partition differently.
local next_tid = 0
function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
end

function bench_seed()
  math.randomseed(os.time() * 1000 + (tid or 0) * 7919 + 17)
  -- LuaJIT's first draws after seeding are correlated with the seed: skip a few.
  for _ = 1, 10 do math.random() end
end

BENCH_N = tonumber(os.getenv("BENCH_N") or "1000000")
