-- POST /token with rotation: each answer's new refresh token is queued for a later request.
-- A peer that does not rotate (the Express original) answers without one: a token is reused.
dofile(os.getenv("BENCH_DIR") .. "/report.lua")
local queue, head, tail = {}, 1, 0

function init(args)
  for line in io.lines(os.getenv("BENCH_TOKENS_LIST")) do
    tail = tail + 1
    queue[tail] = line
  end
  reusable = queue[1]
end

function request()
  local token = queue[head] or reusable
  queue[head] = nil
  head = head + 1
  return wrk.format("POST", "/token", {["Content-Type"] = "application/json"},
                    '{"refreshToken":"' .. token .. '"}')
end

function response(status, headers, body)
  if status == 200 then
    tail = tail + 1
    queue[tail] = body:match('"refreshToken":"([^"]+)"') or reusable
  end
end
