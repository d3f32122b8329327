-- A fixed request (the URL given to wrk), e.g. GET /healthz: the framework's floor.
dofile(os.getenv("BENCH_LUA") .. "/report.lua")
