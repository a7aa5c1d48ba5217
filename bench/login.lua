-- POST /login with the demo account: password hashing dominates it.
dofile(os.getenv("BENCH_DIR") .. "/report.lua")
wrk.method = "POST"
wrk.path = "/login"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"email":"demo@example.com","password":"demo-password"}'
