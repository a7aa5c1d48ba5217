-- GET /me with one valid access token.
dofile(os.getenv("BENCH_DIR") .. "/report.lua")
wrk.method = "GET"
wrk.path = "/me"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_ACCESS")
