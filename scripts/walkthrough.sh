#!/usr/bin/env bash
# A guided tour of the service with curl. Start the server first (python server.py), then:
#   scripts/walkthrough.sh [BASE_URL]        (default http://127.0.0.1:3000)
# Each step says what it does and why, shows the curl command, and prints the answer, with
# tokens shortened and their header and claims decoded. It exits non-zero if an answer is not
# the one the service promises.
set -euo pipefail

BASE="${1:-http://127.0.0.1:3000}"
EMAIL="${DEMO_USER_EMAIL:-demo@example.com}"
PASSWORD="${DEMO_USER_PASSWORD:-demo-password}"
ANSWER=$(mktemp)
HEADERS=$(mktemp)
trap 'rm -f "$ANSWER" "$HEADERS"' EXIT

step() {  # step TITLE WHY...
  printf '\n\033[1m== %s\033[0m\n' "$1"
  shift
  printf '   %s\n' "$@"
}

# call EXPECTED_STATUS SHOWN_COMMAND -- CURL_ARGS...: show the command, run it, print the answer.
call() {
  local expected=$1 shown=$2
  shift 3
  printf '\n$ %s\n' "$shown"
  STATUS=$(curl -sS -D "$HEADERS" -o "$ANSWER" -w '%{http_code}' "$@")
  printf 'HTTP %s\n' "$STATUS"
  grep -iE '^(www-authenticate|cache-control|retry-after):' "$HEADERS" || true
  shorten <"$ANSWER"
  if [ "$STATUS" != "$expected" ]; then
    printf '\nExpected HTTP %s, got %s: the service does not behave as this tour says.\n' \
      "$expected" "$STATUS" >&2
    exit 1
  fi
}

shorten() {  # print JSON with every JWT cut to its first characters: never a whole token
  python3 -c '
import json, re, sys
text = sys.stdin.read()
print(re.sub(r"eyJ[\w-]+\.[\w-]+\.[\w-]*", lambda m: m.group()[:16] + "...", text) or "(no body)")'
}

field() {  # field NAME: a field of the last answer
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$ANSWER" "$1"
}

decode() {  # decode LABEL TOKEN: print a JWT's header and claims (base64url, no key needed)
  python3 - "$1" "$2" <<'PY'
import base64, json, sys, time
label, token = sys.argv[1], sys.argv[2]
def part(segment):
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
header, claims = (part(segment) for segment in token.split(".")[:2])
print(f"   {label} header: {json.dumps(header)}")
print(f"   {label} claims: {json.dumps(claims)}")
left = claims["exp"] - int(time.time())
print(f"   exp is in {left} s ({left // 60} min); jti {claims['jti']!r} names this one token")
PY
}

log_in() {  # POST /login with the demo account; sets ACCESS and REFRESH
  call 200 "curl -s -X POST $BASE/login -H 'Content-Type: application/json' -d '{\"email\": \"$EMAIL\", \"password\": \"...\"}'" -- \
    -X POST "$BASE/login" -H 'Content-Type: application/json' \
    -d "{\"email\": \"$EMAIL\", \"password\": \"$PASSWORD\"}"
  ACCESS=$(field accessToken)
  REFRESH=$(field refreshToken)
}

post_token() {  # post_token EXPECTED_STATUS NAME: POST /token with the refresh token in $NAME
  local name=$2
  call "$1" "curl -s -X POST $BASE/token -H 'Content-Type: application/json' -d \"{\\\"refreshToken\\\": \\\"\$$name\\\"}\"" -- \
    -X POST "$BASE/token" -H 'Content-Type: application/json' -d "{\"refreshToken\": \"${!name}\"}"
}

step "1. Log in" \
  "POST /login checks the password and starts a session: a short-lived access token" \
  "and a long-lived refresh token."
log_in
decode "access token" "$ACCESS"
decode "refresh token" "$REFRESH"

step "2. Use the access token" \
  "GET /me is a protected route: the access token goes in the Authorization header."
call 200 "curl -s $BASE/me -H \"Authorization: Bearer \$ACCESS\"" -- \
  "$BASE/me" -H "Authorization: Bearer $ACCESS"

step "3. Without a token" \
  "No token, no entry: 401 with a WWW-Authenticate challenge (RFC 6750 §3)."
call 401 "curl -s $BASE/me" -- "$BASE/me"

step "4. Refresh" \
  "When the access token runs out, POST /token trades the refresh token for a new pair." \
  "The refresh token is spent by this: the answer carries its replacement (rotation)."
post_token 200 REFRESH
SPENT=$REFRESH
REFRESH=$(field refreshToken)
decode "new refresh token" "$REFRESH"

step "5. Show the spent refresh token again" \
  "A spent token coming back means someone copied it. The service cannot tell the thief" \
  "from the user, so it ends the whole session (RFC 9700 §4.14.2): 403."
post_token 403 SPENT

step "6. ...and the new one died with its session" \
  "The replacement from step 4 belonged to the same session, so it is refused too."
post_token 403 REFRESH

step "7. Log in again, then log out" \
  "POST /logout ends the session of the refresh token; with the access token in the" \
  "Authorization header, that access token stops working at once as well."
log_in
call 204 "curl -s -X POST $BASE/logout -H \"Authorization: Bearer \$ACCESS\" -H 'Content-Type: application/json' -d \"{\\\"refreshToken\\\": \\\"\$REFRESH\\\"}\"" -- \
  -X POST "$BASE/logout" -H "Authorization: Bearer $ACCESS" -H 'Content-Type: application/json' \
  -d "{\"refreshToken\": \"$REFRESH\"}"
call 401 "curl -s $BASE/me -H \"Authorization: Bearer \$ACCESS\"" -- \
  "$BASE/me" -H "Authorization: Bearer $ACCESS"

printf '\nThe tour is over: every answer was the one the service promises.\n'
