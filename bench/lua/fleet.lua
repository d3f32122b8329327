-- bench/fleet: GET /items/{id}, id uniform in 1..BENCH_N, with wrk's threads spread over
-- several addresses. BENCH_TARGETS="127.0.0.1:P1,127.0.0.1:P2,..." (unset: the URL's
-- address): thread t connects to target t mod #targets, so `wrk -t 3 -c 60` with three
-- targets puts 20 connections on each instance, round robin by thread.
dofile(os.getenv("BENCH_LUA") .. "/report.lua")

local targets = nil
local next_thread = 0

function setup(thread)
  if targets == nil then
    targets = {}
    for hostport in string.gmatch(os.getenv("BENCH_TARGETS") or "", "[^,]+") do
      local host, port = string.match(hostport, "^(.+):(%d+)$")
      targets[#targets + 1] = wrk.lookup(host, port)[1]
    end
  end
  if #targets > 0 then
    thread.addr = targets[(next_thread % #targets) + 1]
  end
  thread:set("tid", next_thread)
  next_thread = next_thread + 1
end

function init(args)
  bench_seed()
end

function request()
  return wrk.format("GET", "/items/" .. math.random(BENCH_N))
end
