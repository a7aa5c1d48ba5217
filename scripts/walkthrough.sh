#!/usr/bin/env bash
# A guided tour of the service with curl. Start the server first (make run), then:
#   scripts/walkthrough.sh [BASE_URL]        (default http://127.0.0.1:3000)
# It logs in with the demo account. Production has none: give an account of USERS_FILE with
#   TOUR_EMAIL=alice@example.com scripts/walkthrough.sh https://auth.example.com
# which asks for its password without echo (or reads TOUR_PASSWORD) and never prints it.
# Each step says what it does and why, and prints each command it runs exactly as it runs it:
# pasted in order into bash, they do the same. Answers are printed with every token shortened,
# never whole, and tokens' headers and claims decoded. It exits non-zero if any answer is not
# the one the service promises. It needs curl and python3.
# The commands are built and printed with their $VARIABLES unexpanded, in single quotes:
# shellcheck disable=SC2016
set -euo pipefail

BASE="${1:-http://127.0.0.1:3000}"
if [ -n "${TOUR_EMAIL:-}" ]; then  # an account of USERS_FILE: its password is never printed
  EMAIL=$TOUR_EMAIL
  if [ -z "${TOUR_PASSWORD:-}" ]; then
    read -rsp "Password for $EMAIL: " TOUR_PASSWORD </dev/tty
    printf '\n'
  fi
  PASSWORD=$TOUR_PASSWORD
  DEMO=no
else
  EMAIL="${DEMO_USER_EMAIL:-demo@example.com}"
  PASSWORD="${DEMO_USER_PASSWORD:-demo-password}"  # the demo account's, printed on purpose
  DEMO=yes
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# The printed commands are what a user types. This script learns each answer's status and
# headers from a curl configuration of its own, which those commands do not need.
export CURL_HOME=$WORK
printf 'dump-header = "%s/headers"\n' "$WORK" >"$WORK/.curlrc"
if [ -t 1 ]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD='' PLAIN=''; fi

step() {  # step TITLE WHY...: a heading, and what the step shows
  printf '\n%s== %s%s\n' "$BOLD" "$1" "$PLAIN"
  shift
  printf '   %s\n' "$@"
}

fail() {
  printf '\n%s: the service does not behave as this tour says.\n' "$1" >&2
  exit 1
}

run() {  # run COMMAND: print a command, run exactly it, and stop the tour if it fails
  printf '$ %s\n' "$1"
  eval "$1" || fail "This command failed"
}

# request STATUS COMMAND [ERROR]: print a curl command and run exactly it; print its status,
# its notable headers and its answer; stop the tour unless they are STATUS (and ERROR).
request() {
  local expected=$1 command=$2 error=${3:-} status
  rm -f "$WORK/headers"
  printf '\n$ %s\n' "$command"
  eval "$command" >"$WORK/body" || fail "curl could not reach $BASE"
  if [[ $command =~ ^([A-Z]+)=\$\( ]]; then  # NAME=$(curl ...) keeps the answer in NAME
    printf '%s' "${!BASH_REMATCH[1]}" >"$WORK/body"
  fi
  status=$(grep -E '^HTTP/' "$WORK/headers" | tail -n 1 | cut -d ' ' -f 2)
  printf 'HTTP %s\n' "$status"
  grep -iE '^(www-authenticate|retry-after):' "$WORK/headers" | tr -d '\r' || true
  show <"$WORK/body"
  [ "$status" = "$expected" ] || fail "Expected HTTP $expected, got $status"
  if [ -n "$error" ]; then
    [ "$(json error <"$WORK/body")" = "$error" ] || fail "Expected the error $error"
  fi
}

show() {  # print a JSON answer indented, with every JWT cut short: never a whole token
  python3 -c '
import json, re, sys
text = sys.stdin.read()
if text:
    text = json.dumps(json.loads(text), indent=2)
print(re.sub(r"eyJ[\w-]+\.[\w-]+\.[\w-]+", lambda m: m[0][:10] + "..." + m[0][-6:], text)
      or "(no body)")'
}

expect() {  # expect WHAT PYTHON_CONDITION: check the last answer (as `answer`), say what held
  python3 -c "import json, sys; answer = json.load(sys.stdin); sys.exit(not ($2))" \
    <"$WORK/body" || fail "Expected $1"
  printf '   -> %s\n' "$1"
}

# decode LABEL TOKEN [EARLIER]: print a JWT's header and claims (base64url: no key needed);
# with EARLIER, the token it replaced, check that it keeps that token's session and expiry.
decode() {
  python3 - "$@" <<'PY'
import base64, json, sys
label, token, earlier = (sys.argv[1:] + [""])[:3]
def claims_of(token, index=1):
    segment = token.split(".")[index]
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
def human(seconds):
    units = [("day", 86400), ("h", 3600), ("min", 60), ("s", 1)]
    parts = []
    for name, size in units:
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count} {name}s" if name == "day" and count > 1 else f"{count} {name}")
    return " ".join(parts)
claims = claims_of(token)
print(f"   {label} header: {json.dumps(claims_of(token, 0))}")
print(f"   {label} claims: {json.dumps(claims)}")
if not earlier:
    print(f"   it lives {human(claims['exp'] - claims['iat'])} (exp - iat), in session {claims['sid']}")
elif claims["exp"] == claims_of(earlier)["exp"] and claims["sid"] == claims_of(earlier)["sid"]:
    print("   the same sid and exp as before: rotation never makes a session longer")
else:
    sys.exit(1)
PY
}

quote() {  # quote TEXT: TEXT in single quotes, as a shell reads it back
  printf "'%s'" "${1//\'/\'\\\'\'}"
}

CREDENTIALS_JSON=$(python3 -c 'import json, sys
print(json.dumps({"email": sys.argv[1], "password": sys.argv[2]}))' "$EMAIL" "$PASSWORD")
CHANGE_JSON=$(python3 -c 'import json, sys
print(json.dumps({"currentPassword": sys.argv[1], "newPassword": "too short"}))' "$PASSWORD")
if [ "$DEMO" = yes ]; then  # the demo's password, shown in the commands as they run
  CREDENTIALS=$(quote "$CREDENTIALS_JSON") CHANGE=$(quote "$CHANGE_JSON")
else  # a real password: the commands name the variables that hold it
  CREDENTIALS='"$CREDENTIALS_JSON"' CHANGE='"$CHANGE_JSON"'
fi
JSON_BODY="-H 'Content-Type: application/json'"

log_in() {  # log_in [CURL_OPTIONS]: the command that logs in with the tour's account
  printf 'ANSWER=$(curl -s -X POST %s/login%s %s -d %s)' \
    "$BASE" "${1:+ $1}" "$JSON_BODY" "$CREDENTIALS"
}

post_token() {  # post_token NAME: the command that sends the refresh token in $NAME to /token
  printf 'ANSWER=$(curl -s -X POST %s/token %s -d "{\\"refreshToken\\": \\"$%s\\"}")' \
    "$BASE" "$JSON_BODY" "$1"
}

post_logout() {  # post_logout NAME [SCOPE]: the command that logs out with the token in $NAME
  local scope=""
  [ -z "${2:-}" ] || scope=", \\\"scope\\\": \\\"$2\\\""
  printf 'curl -s -X POST %s/logout %s -d "{\\"refreshToken\\": \\"$%s\\"%s}"' \
    "$BASE" "$JSON_BODY" "$1" "$scope"
}

get() {  # get PATH NAME: the command that GETs PATH with the access token in $NAME
  printf 'curl -s %s%s -H "Authorization: Bearer $%s"' "$BASE" "$1" "$2"
}

keep_tokens() {  # keep both tokens of the last answer in ACCESS and REFRESH
  run 'ACCESS=$(echo "$ANSWER" | json accessToken)'
  run 'REFRESH=$(echo "$ANSWER" | json refreshToken)'
}

if ! curl -s -o /dev/null "$BASE/healthz"; then
  printf 'No service answers at %s: start it first (python server.py).\n' "$BASE" >&2
  exit 1
fi

step "0. A helper" \
  "The answers are JSON; this prints one field of the JSON it reads, so the commands below" \
  "can keep tokens in shell variables."
run "json() { python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' \"\$1\"; }"
if [ "$DEMO" = no ]; then
  printf '   The logins send $CREDENTIALS_JSON, {"email": "%s", "password": ...}, and step 10\n' "$EMAIL"
  printf '   $CHANGE_JSON: they hold the password you gave, which is never printed.\n'
fi

step "1. Log in" \
  "POST /login checks the password and starts a session: a short-lived access token and a" \
  "long-lived refresh token. Both name the session (sid) and the key that signed them (kid)."
request 200 "$(log_in)"
keep_tokens
decode "access token" "$ACCESS"
decode "refresh token" "$REFRESH"

step "2. Use the access token" \
  "GET /me is a protected route: the access token goes in the Authorization header."
request 200 "$(get /me ACCESS)"

step "3. Without a token" \
  "No token, no entry: 401 with a WWW-Authenticate challenge (RFC 6750 §3)."
request 401 "curl -s $BASE/me" missing_token

step "4. Refresh" \
  "When the access token runs out, POST /token trades the refresh token for a new pair." \
  "The refresh token is spent by this: the answer carries its replacement (rotation)."
run 'SPENT=$REFRESH'
request 200 "$(post_token SPENT)"
keep_tokens
decode "new refresh token" "$REFRESH" "$SPENT" || fail "Rotation should keep the sid and exp"

step "5. Retry that refresh" \
  "A client whose answer got lost, or a second tab, sends the spent token again. Within" \
  "REFRESH_REUSE_GRACE seconds (10 by default) of its refresh that is no theft: the answer" \
  "carries the same current refresh token, byte for byte, and a new access token."
request 200 "$(post_token SPENT)"
run '[ "$(echo "$ANSWER" | json refreshToken)" = "$REFRESH" ] && echo "the same refresh token"'

step "6. Refresh again, then show the first refresh token once more" \
  "Now the login's refresh token is two rotations old, past any grace. Shown again, it means" \
  "two parties hold it; the service cannot tell the thief from the user, so it ends the" \
  "whole session (RFC 9700 §4.14.2): 403."
request 200 "$(post_token REFRESH)"
keep_tokens
request 403 "$(post_token SPENT)" invalid_refresh_token

step "7. Every token of that session died with it" \
  "The newest refresh token is refused, and so is the access token: an access token works" \
  "only while its session lives."
request 403 "$(post_token REFRESH)" invalid_refresh_token
request 401 "$(get /me ACCESS)" invalid_token

step "8. Two devices, and the list of sessions" \
  "Log in as a phone, then as a laptop (-A sets the User-Agent the list shows). GET /sessions" \
  "lists the user's live sessions, most recently used first; current marks this one."
request 200 "$(log_in "-A 'phone'")"
run 'PHONE=$(echo "$ANSWER" | json accessToken)'
request 200 "$(log_in "-A 'laptop'")"
keep_tokens
request 200 "$(get /sessions ACCESS)"
expect "two sessions, the laptop's marked current; the session of step 1 is gone" \
  'sorted((s["userAgent"], s["current"]) for s in answer["sessions"])
   == [("laptop", True), ("phone", False)]'

step "9. Log out everywhere else" \
  "POST /logout with \"scope\": \"others\" ends every other session of the user; this one stays." \
  "(\"local\", the default, ends this session; \"global\" ends them all.)"
request 204 "$(post_logout REFRESH others)"
request 401 "$(get /me PHONE)" invalid_token
request 200 "$(get /sessions ACCESS)"
expect "one session left, this one" \
  '[(s["userAgent"], s["current"]) for s in answer["sessions"]] == [("laptop", True)]'

step "10. Change the password" \
  "POST /password, with the access token and the current password, sets a new one (204); every" \
  "other session of the account ends, this one goes on. The current password is checked as a" \
  "login's is, under the same limits. A new password has at least 15 characters, and is not" \
  "the email nor a common one; only accounts of USERS_FILE change theirs here. This tour keeps" \
  "your password: it sends a new one too short, which the service refuses, saying why."
request_password="curl -s -X POST $BASE/password -H \"Authorization: Bearer \$ACCESS\""
request_password+=" $JSON_BODY -d $CHANGE"
if [ "$DEMO" = yes ]; then
  request 403 "$request_password" password_not_changeable
else
  request 400 "$request_password" weak_password
fi

step "11. Log out" \
  "POST /logout ends this session; its access token stops working at once."
request 204 "$(post_logout REFRESH)"
request 401 "$(get /me ACCESS)" invalid_token

printf '\nThe tour is over. It showed a login, the access token at /me, a refresh and its\n'
printf 'rotation, a retried refresh getting the same token, reuse detection ending a session\n'
printf 'with all its tokens, the list of sessions, and logging out the others, then this one.\n'
printf 'Every answer was the one the service promises.\n'
