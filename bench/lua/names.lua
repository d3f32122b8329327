-- GET /items?name=<the exact name of id n> (lookup by name, issue 16). The seed
-- (src/seed.rs) names item n "<adjective> <material> <noun> <n, 7 digits>", so every
-- seeded name belongs to exactly one item and the name of any id can be computed here.
-- BENCH_NAMES=uniform (default): n uniform in 1..BENCH_N (hit path once the names are
-- cached); BENCH_NAMES=sequential: every request a new name, as sequential.lua does for
-- ids (thread t of BENCH_THREADS takes BENCH_START + t, + 2t, ...; a cold name and item).
dofile(os.getenv("BENCH_LUA") .. "/report.lua")

local ADJ = { "Compact", "Deluxe", "Rugged", "Classic", "Smart", "Portable", "Ergonomic", "Vintage", "Quiet",
  "Heavy-duty", "Slim", "Modular", "Wireless", "Foldable", "Premium", "Eco" }
local MAT = { "Steel", "Oak", "Bamboo", "Copper", "Ceramic", "Carbon", "Linen", "Glass", "Walnut", "Titanium" }
local NOUN = { "Widget", "Kettle", "Lamp", "Backpack", "Chair", "Speaker", "Notebook", "Bottle", "Clock", "Drill",
  "Mug", "Router", "Blender", "Desk", "Helmet", "Tent", "Camera", "Keyboard", "Scarf", "Skillet" }

local mode = os.getenv("BENCH_NAMES") or "uniform"
local threads = tonumber(os.getenv("BENCH_THREADS") or "1")
local start = tonumber(os.getenv("BENCH_START") or "1")
local next_n

-- The URL path of the name of item n (spaces as %20).
function name_path(n)
  return string.format("/items?name=%s%%20%s%%20%s%%20%07d",
    ADJ[1 + (n * 7) % 16], MAT[1 + (n * 13) % 10], NOUN[1 + (n * 31) % 20], n)
end

function init(args)
  bench_seed()
  next_n = start + (tid or 0)
end

function request()
  local n
  if mode == "sequential" then
    n = next_n
    next_n = next_n + threads
    if next_n > BENCH_N then
      next_n = 1 + (tid or 0)
    end
  else
    n = math.random(BENCH_N)
  end
  return wrk.format("GET", name_path(n))
end
