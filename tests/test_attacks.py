"""Play the attacker: every row is a forged or broken token that must be refused.

The attacks come from RFC 8725 (JWT Best Current Practices), RFC 7515 §4.1.11 (crit), and the
cases PyJWT's and Flask-JWT-Extended's own suites check. Each runs twice: as an access token
at GET /me (401) and as a refresh token at POST /token (403).
"""

import base64
import contextlib
import json
import logging
import re
import socket
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import jwt
import pytest
from jwt.warnings import InsecureKeyLengthWarning

import users
from errors import after_colon
from keys import hmac_kid
from server import create_app

from .conftest import (
    ACCESS_SECRET,
    DEMO,
    REAL_HASHING,
    REFRESH_SECRET,
    ROOT,
    TEST_CONFIG,
    audit_records,
    call,
    free_port,
    granian,
    released_together,
    run_to_end,
    serve,
    user_env,
)

SECRETS = {"access": ACCESS_SECRET, "refresh": REFRESH_SECRET}
TYP = {"access": "at+jwt", "refresh": "rt+jwt"}


def b64(data):
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims(kind, **changes):
    """Valid claims for a token of this kind, with some changed (None removes a claim)."""
    now = int(time.time())
    payload = {"iss": "jwt-refresh-service", "aud": "jwt-refresh-service", "sub": "1"}
    payload |= {"iat": now, "exp": now + 900, "jti": "attack-jti", "sid": "attack-session"}
    payload |= changes
    return {key: value for key, value in payload.items() if value is not None}


def sign(kind, payload=None, key=None, algorithm="HS256", **headers):
    """A token signed like ours unless told otherwise."""
    headers = {"typ": TYP[kind], "kid": hmac_kid(SECRETS[kind])} | headers
    headers = {key: value for key, value in headers.items() if value is not None}
    payload = claims(kind) if payload is None else payload
    with warnings.catch_warnings():  # an attacker does not mind a short key for HS384/HS512
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(payload, key or SECRETS[kind], algorithm, headers=headers)


def unsigned(kind, alg):
    """An `alg: none` token: header and payload, empty signature (RFC 8725 §2.1)."""
    header = {"alg": alg, "typ": TYP[kind], "kid": hmac_kid(SECRETS[kind])}
    return f"{b64(header)}.{b64(claims(kind))}."


def tampered(kind):
    """Our valid token with its payload swapped for another user's (RFC 8725 §2.1)."""
    header, _, signature = sign(kind).split(".")
    return f"{header}.{b64(claims(kind, sub='2'))}.{signature}"


def now():
    return int(time.time())


# Our own words for each refusal: none of them repeats what the attacker put in the token.
NOT_ALLOWED = "The token is signed with an algorithm this service refuses."
BAD_SIGNATURE = "The token's signature does not match."
MALFORMED = "The token is malformed."
NOT_VALID = "The token is not valid."
UNKNOWN_KEY = "The token is signed with a key this service does not hold."
KEY_POINTER = "The token's header points at a key; this service never uses one."
WRONG_KIND = "This is not {kind} token."
OTHER_KIND = "This is {other} token; send {kind} token."
ATTACKER_KEY = "an-attacker-guessed-this-secret-000"


def missing(claim):
    return f"The token lacks the '{claim}' claim."


def other_key(kind):
    return SECRETS["refresh" if kind == "access" else "access"]


# fmt: off
ATTACKS = [
    # RFC 8725 §2.1, §3.1: "none" in any spelling is never an accepted algorithm.
    ("alg none", lambda k: unsigned(k, "none"), NOT_ALLOWED),
    ("alg None", lambda k: unsigned(k, "None"), NOT_ALLOWED),
    ("alg NONE", lambda k: unsigned(k, "NONE"), NOT_ALLOWED),
    ("alg nOnE", lambda k: unsigned(k, "nOnE"), NOT_ALLOWED),
    # RFC 8725 §3.1: the algorithm is ours to choose, not the token's.
    ("re-signed HS384", lambda k: sign(k, algorithm="HS384"), NOT_ALLOWED),
    ("re-signed HS512", lambda k: sign(k, algorithm="HS512"), NOT_ALLOWED),
    # RFC 7515 §5.2: the signature covers header and payload.
    ("stripped signature", lambda k: sign(k).rsplit(".", 1)[0] + ".", BAD_SIGNATURE),
    ("tampered payload", tampered, BAD_SIGNATURE),
    ("wrong key", lambda k: sign(k, key=ATTACKER_KEY), BAD_SIGNATURE),
    ("other kind's key", lambda k: sign(k, key=other_key(k)), BAD_SIGNATURE),
    # RFC 7515 §4.1.4: the kid names one of our keys, or the token is refused.
    ("missing kid", lambda k: sign(k, kid=None), UNKNOWN_KEY),
    ("unknown kid", lambda k: sign(k, kid="not-one-of-ours"), UNKNOWN_KEY),
    ("kid not a string", lambda k: f"{b64({'alg': 'HS256', 'typ': TYP[k], 'kid': ['a']})}."
     + sign(k).split(".", 1)[1], UNKNOWN_KEY),
    ("other kind's kid", lambda k: sign(k, kid=hmac_kid(other_key(k))), UNKNOWN_KEY),
    ("attacker's key, named by its own kid",
     lambda k: sign(k, key=ATTACKER_KEY, kid=hmac_kid(ATTACKER_KEY)), UNKNOWN_KEY),
    # RFC 7519 §4.1: the claims we rely on are present and well typed.
    ("expired", lambda k: sign(k, claims(k, iat=now() - 999, exp=now() - 99)),
     "The token has expired."),
    ("exp not a number", lambda k: sign(k, claims(k, exp="never")), MALFORMED),
    ("missing exp", lambda k: sign(k, claims(k, exp=None)), missing("exp")),
    ("missing iat", lambda k: sign(k, claims(k, iat=None)), missing("iat")),
    ("missing sub", lambda k: sign(k, claims(k, sub=None)), missing("sub")),
    ("missing sid", lambda k: sign(k, claims(k, sid=None)), missing("sid")),
    ("missing jti", lambda k: sign(k, claims(k, jti=None)), missing("jti")),
    ("sub not a string", lambda k: sign(k, claims(k, sub=1)), NOT_VALID),
    # RFC 7515 §7.1: a compact JWS is exactly three base64url parts.
    ("two parts", lambda k: sign(k).rsplit(".", 1)[0], MALFORMED),
    ("four parts", lambda k: sign(k) + ".extra", MALFORMED),
    ("not base64url", lambda k: "!!!." + sign(k).split(".", 1)[1], MALFORMED),
    ("header not an object", lambda k: b64(b"[1]") + "." + sign(k).split(".", 1)[1], MALFORMED),
    ("non-ASCII in the token", lambda k: sign(k)[:-4] + "\u00e9\u00e9\u00e9\u00e9", MALFORMED),
    # RFC 8725 §3.1: bound the input before any work is done on it.
    ("over 8 KiB", lambda k: sign(k, claims(k, pad="x" * 9000)),
     "The token is longer than any token this service issues."),
    # RFC 7519 §4.1.5-4.1.6: not valid yet, beyond the leeway.
    ("nbf in the future", lambda k: sign(k, claims(k, nbf=now() + 60)),
     "The token is not valid yet."),
    ("iat in the future", lambda k: sign(k, claims(k, iat=now() + 60)),
     "The token is not valid yet."),
    # RFC 8725 §3.8-3.9: issued by us, for us.
    ("wrong iss", lambda k: sign(k, claims(k, iss="https://evil.example")),
     "The token was not issued by this service."),
    ("missing iss", lambda k: sign(k, claims(k, iss=None)), missing("iss")),
    ("wrong aud", lambda k: sign(k, claims(k, aud="another-service")),
     "The token is not meant for this service."),
    ("missing aud", lambda k: sign(k, claims(k, aud=None)), missing("aud")),
    # RFC 8725 §3.10: keys are never taken from, or fetched for, a header.
    ("jwk header", lambda k: sign(k, jwk={"kty": "oct", "k": b64(b"k" * 32)}), KEY_POINTER),
    ("jku header", lambda k: sign(k, jku="https://evil.example/keys"), KEY_POINTER),
    ("x5u header", lambda k: sign(k, x5u="https://evil.example/cert.pem"), KEY_POINTER),
    ("x5c header", lambda k: sign(k, x5c=["MIIB"]), KEY_POINTER),
    # RFC 7515 §4.1.11: an extension we do not understand must not be ignored; its name is
    # the attacker's, so the answer does not repeat it.
    ("unknown crit", lambda k: sign(k, crit=["<script>"], **{"<script>": 1}), NOT_VALID),
    # RFC 8725 §3.11: explicit typing, so one kind never passes for another.
    ("missing typ", lambda k: sign(k, typ=None), WRONG_KIND),
    ("plain JWT typ", lambda k: sign(k, typ="JWT"), WRONG_KIND),
    ("the other kind's typ", lambda k: sign(k, typ=TYP["refresh" if k == "access" else "access"]),
     OTHER_KIND),
]
# fmt: on


@pytest.mark.parametrize("kind", ["access", "refresh"])
@pytest.mark.parametrize(
    "make_token, reason", [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS]
)
def test_attack_is_refused(client, kind, make_token, reason):
    token = make_token(kind)
    names = {"access": "an access", "refresh": "a refresh"}
    other = names["refresh" if kind == "access" else "access"]
    reason = reason.format(kind=names[kind], other=other)
    if kind == "access":
        response = client.get("/me", headers={"Authorization": f"Bearer {token}"})
        expected = {
            "error": "invalid_token",
            "message": f"The access token is not valid: {after_colon(reason)} "
            "Log in or refresh to get a new one.",
        }
        assert (response.status_code, response.json) == (401, expected)
        assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    else:
        response = client.post("/token", json={"refreshToken": token})
        expected = {
            "error": "invalid_refresh_token",
            "message": f"The refresh token is not valid: {after_colon(reason)} Log in again.",
        }
        assert (response.status_code, response.json) == (403, expected)


def test_a_well_formed_token_is_accepted(client):
    """The control row: the same builders, unmodified, make a token /me accepts."""
    issued = jwt.decode(
        client.post("/login", json=DEMO).json["accessToken"], options={"verify_signature": False}
    )
    token = sign("access", claims("access", sub=issued["sub"], sid=issued["sid"]))
    assert client.get("/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_no_refusal_repeats_what_the_attacker_wrote(client):
    """RFC 8725 §3.10 spirit: a message never echoes an unverified value from a header."""
    marker = "ATTACKER-MARKER"
    for headers in (
        {"kid": marker},
        {"typ": marker},
        {"alg": marker},
        {"crit": [marker], marker: 1},
    ):
        token = sign("access", **{k: v for k, v in headers.items() if k != "alg"})
        if "alg" in headers:
            token = f"{b64({'alg': marker, 'typ': TYP['access']})}.{b64(claims('access'))}.x"
        for response in (
            client.get("/me", headers={"Authorization": f"Bearer {token}"}),
            client.post("/token", json={"refreshToken": token}),
        ):
            assert response.status_code in (401, 403)
            assert marker not in response.get_data(as_text=True)


@pytest.fixture
def equal_secrets_client():
    """Both kinds signed with one key: allowed in development, and typing still holds."""
    return create_app(TEST_CONFIG | {"REFRESH_TOKEN_SECRET": ACCESS_SECRET}).test_client()


def test_access_token_is_refused_at_token_even_with_equal_secrets(equal_secrets_client):
    tokens = equal_secrets_client.post("/login", json=DEMO).json
    response = equal_secrets_client.post("/token", json={"refreshToken": tokens["accessToken"]})
    assert (response.status_code, response.json) == (
        403,
        {
            "error": "invalid_refresh_token",
            "message": "The refresh token is not valid: this is an access token; "
            "send a refresh token. Log in again.",
        },
    )


def test_refresh_token_is_refused_at_me_even_with_equal_secrets(equal_secrets_client):
    tokens = equal_secrets_client.post("/login", json=DEMO).json
    response = equal_secrets_client.get(
        "/me", headers={"Authorization": f"Bearer {tokens['refreshToken']}"}
    )
    assert response.status_code == 401
    assert response.json == {
        "error": "invalid_token",
        "message": "The access token is not valid: this is a refresh token; "
        "send an access token. Log in or refresh to get a new one.",
    }


# --- over HTTP, against real server processes ---------------------------------------------


WRONG = DEMO | {"password": "wrong password"}


@pytest.fixture(params=["python server.py", "granian, 2 workers, Redis"])
def throttled_server(request, start_server):
    """A server whose login limit is 3 per email and address, as each kind of user runs it."""
    limit = {"LOGIN_RATE_LIMIT": "3 per 15 minutes"}
    if request.param == "python server.py":
        return start_server(**limit)
    return request.getfixturevalue("start_cluster")(**limit)[0]


def test_guesses_sent_at_the_same_moment_never_pass_the_limit(throttled_server):
    # NIST SP 800-63B §5.2.2: the limit bounds guesses however they arrive.
    statuses = released_together(12, lambda _: call(throttled_server, "POST", "/login", WRONG)[0])
    assert sorted(statuses) == [401] * 3 + [429] * 9
    assert call(throttled_server, "POST", "/login", DEMO)[0] == 429  # locked, right password too


def test_a_successful_login_clears_the_count_for_its_email(live_server):
    for _ in range(9):
        assert call(live_server, "POST", "/login", WRONG)[0] == 401
    assert call(live_server, "POST", "/login", DEMO)[0] == 200
    for _ in range(10):  # ten fresh guesses again: the user who knew the password reset them
        assert call(live_server, "POST", "/login", WRONG)[0] == 401
    assert call(live_server, "POST", "/login", WRONG)[0] == 429


def test_an_account_is_limited_across_addresses(client):
    app = create_app(TEST_CONFIG | {"LOGIN_ACCOUNT_RATE_LIMIT": "4 per day"})
    client = app.test_client()
    for n in range(4):
        address = {"REMOTE_ADDR": f"192.0.2.{n}"}
        assert client.post("/login", json=WRONG, environ_base=address).status_code == 401
    response = client.post("/login", json=DEMO, environ_base={"REMOTE_ADDR": "198.51.100.9"})
    assert response.status_code == 429


def test_an_address_is_limited_across_emails_and_a_success_never_resets_it():
    client = create_app(
        TEST_CONFIG | {"LOGIN_ADDRESS_RATE_LIMIT": "5 per 15 minutes"}
    ).test_client()
    for n in range(3):
        assert client.post("/login", json=WRONG | {"email": f"user{n}@x.test"}).status_code == 401
    assert client.post("/login", json=DEMO).status_code == 200  # counted, and clears nothing
    assert client.post("/login", json=WRONG | {"email": "user9@x.test"}).status_code == 401
    assert client.post("/login", json=DEMO).status_code == 429  # spraying: the address is done
    other = {"REMOTE_ADDR": "192.0.2.50"}
    assert client.post("/login", json=DEMO, environ_base=other).status_code == 200


@pytest.mark.parametrize(
    "limit", ["LOGIN_RATE_LIMIT", "LOGIN_ACCOUNT_RATE_LIMIT", "LOGIN_ADDRESS_RATE_LIMIT"]
)
def test_every_limit_answers_the_same_and_the_audit_line_names_it(limit, capsys):
    client = create_app(TEST_CONFIG | {limit: "1 per minute"}).test_client()
    for email in ("demo@example.com", "nobody@example.com"):  # known and unknown alike
        client.post("/login", json=WRONG | {"email": email})
        response = client.post("/login", json=WRONG | {"email": email})
        assert response.status_code == 429
        assert response.json == {
            "error": "too_many_requests",
            "message": "Too many failed logins; retry in 1 minute.",
        }
        if limit != "LOGIN_RATE_LIMIT":
            break  # the account or address limit is reached for every email alike
    names = {"LOGIN_RATE_LIMIT": "email_address", "LOGIN_ACCOUNT_RATE_LIMIT": "account",
             "LOGIN_ADDRESS_RATE_LIMIT": "address"}  # fmt: skip
    throttled = audit_records(capsys.readouterr().err, "login_throttled")
    assert throttled and {record["limit"] for record in throttled} == {names[limit]}


@pytest.mark.parametrize(
    "field, value",
    [("email", "a" * 243 + "@example.com"), ("password", "p" * 1025)],
)
def test_oversized_credentials_are_refused_before_any_work(live_server, field, value):
    # RFC 5321 §4.5.3.1.3 (254 characters) and a 1024-character passphrase bound the input.
    for _ in range(5):  # not counted: the limit of 10 is never reached
        status, _, body = call(live_server, "POST", "/login", DEMO | {field: value})
        assert (status, body["error"]) == (400, "invalid_field")
    for _ in range(10):
        assert call(live_server, "POST", "/login", WRONG)[0] == 401


def test_a_login_that_gets_no_hashing_slot_is_a_503(monkeypatch):
    monkeypatch.setattr(users, "SLOT_WAIT", 0.01)
    app = create_app(TEST_CONFIG | {"MAX_CONCURRENT_LOGINS": "1"})
    client, hashing = app.test_client(), app.extensions["users"].hashing
    # Another login is hashing while this one arrives.
    response = hashing.run(lambda: client.post("/login", json=DEMO))
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.json["error"] == "server_busy"
    assert app.test_client().post("/login", json=DEMO).status_code == 200  # the slot is back


def peak_memory(pid):
    """The highest resident memory a process ever had (VmHWM), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def server_pids(url):
    """The pids of the processes started with PORT set to the URL's port."""
    port = url.rsplit(":", 1)[1]
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            environ = (cmdline.parent / "environ").read_bytes()
            if f"\0PORT={port}\0".encode() in b"\0" + environ:
                pids.append(int(cmdline.parent.name))
    return pids


def login_memory_growth(start_server, **settings):
    """Peak memory a `python server.py` gains while forty logins with unknown emails run."""
    # The real Argon2id parameters: the bound is on the memory they take.
    url = start_server(LOGIN_ADDRESS_RATE_LIMIT="100 per minute", **REAL_HASHING, **settings)
    call(url, "POST", "/login", DEMO)  # warm up: one hash before the baseline
    (pid,) = server_pids(url)
    before = peak_memory(pid)
    statuses = released_together(
        40, lambda n: call(url, "POST", "/login", {"email": f"u{n}@x.test", "password": "pw"})[0]
    )
    assert set(statuses) <= {401, 503}
    return peak_memory(pid) - before


def test_forty_parallel_logins_do_not_take_forty_hashes_of_memory(start_server):
    # OWASP Password Storage Cheat Sheet: memory-hard hashing, so bound how many run at once.
    bounded = login_memory_growth(start_server, MAX_CONCURRENT_LOGINS="2")
    unbounded = login_memory_growth(start_server, MAX_CONCURRENT_LOGINS="40")  # the control
    # Each Argon2id check holds 19 MiB: two slots bound the growth to about 40 MiB, while
    # forty at once take several hundred (the control shows the measurement sees it).
    assert bounded < 80 * 2**20, f"grew by {bounded // 2**20} MiB"
    assert unbounded > 3 * bounded, (unbounded // 2**20, bounded // 2**20)


def test_a_store_that_fails_mid_login_is_a_503_never_a_500(redis_url, redis_client, start_server):
    # A Redis user that may touch the login counters but not the sessions: the count
    # succeeds, then writing the session fails, as when Redis dies between the two.
    redis_client.acl_setuser(
        "half", enabled=True, passwords=["+pw"], keys=["LIMITS*"], commands=["+@all"]
    )
    try:
        half = redis_url.replace("redis://", "redis://half:pw@")
        url = start_server(REDIS_URL=half)
        status, headers, body = call(url, "POST", "/login", DEMO)
        assert (status, headers["Retry-After"], body["error"]) == (503, "5", "store_unavailable")
    finally:
        redis_client.acl_deluser("half")


def test_redis_down_during_logins_is_a_503_and_counts_again_when_it_returns(
    own_redis, start_server
):
    url = start_server(REDIS_URL=own_redis.url, LOGIN_RATE_LIMIT="2 per 15 minutes")
    own_redis.stop()
    for _ in range(3):
        status, headers, body = call(url, "POST", "/login", WRONG)
        assert (status, headers["Retry-After"], body["error"]) == (503, "5", "store_unavailable")
    own_redis.start()
    assert [call(url, "POST", "/login", WRONG)[0] for _ in range(3)] == [401, 401, 429]


def test_the_demo_password_never_works_under_a_production_server(tmp_path):
    # OWASP ASVS 2.1: no well-known credentials; APP_ENV left out does not change that.
    port = free_port()
    env = user_env(**TEST_CONFIG)
    with serve(granian(port, workers=1), env, tmp_path, port) as (url, _):
        assert call(url, "POST", "/login", DEMO)[0] == 401


def test_production_refuses_the_memory_store_under_a_forking_server(tmp_path):
    # Each worker would keep its own sessions, so a logout would not reach the others.
    env = user_env(**TEST_CONFIG, APP_ENV="production")
    status, output = run_to_end(granian(free_port()), env, tmp_path)
    assert status != 0
    assert "needs REDIS_URL" in output


# --- bodies and headers, however they are framed -------------------------------------------


def raw_request(url, head, body=b"", stop_sending=False):
    """Send bytes as they are, for what urllib would refuse to send; return the answer's head.
    With stop_sending, the client then says it sends no more (a half-close)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + b"\r\nHost: x\r\nConnection: close\r\n\r\n" + body)
        if stop_sending:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    return answer


def chunked(body, size=8192):
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


@pytest.fixture(scope="module", params=["python server.py", "granian"])
def any_server(request, tmp_path_factory):
    """Each kind of server, one for the tests of this file that only send it requests."""
    port = free_port()
    if request.param == "python server.py":
        command, env = [sys.executable, str(ROOT / "server.py")], user_env(PORT=str(port))
    else:
        command = granian(port, workers=1)
        env = user_env(**TEST_CONFIG, DEMO_USER_PASSWORD=DEMO["password"])
    with serve(command, env, tmp_path_factory.mktemp("any-server"), port) as (url, _):
        yield url


def test_a_body_over_64_kib_is_413_however_it_is_framed(any_server):
    login = json.dumps(DEMO).encode()
    padded = login + b" " * 70_000 + b"junk"
    head = b"POST /login HTTP/1.1\r\nContent-Type: application/json"
    as_chunks = raw_request(any_server, head + b"\r\nTransfer-Encoding: chunked", chunked(padded))
    assert as_chunks.split(b"\r\n", 1)[0].split()[1] == b"413"
    with_length = raw_request(any_server, head + b"\r\nContent-Length: %d" % len(padded), padded)
    assert with_length.split(b"\r\n", 1)[0].split()[1] == b"413"
    small = raw_request(any_server, head + b"\r\nTransfer-Encoding: chunked", chunked(login, 7))
    assert small.split(b"\r\n", 1)[0].split()[1] == b"200"  # chunked itself is fine


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        (b"Transfer-Encoding: chunked", b"zz\r\nnot a chunk size\r\n0\r\n\r\n"),
        (b"Transfer-Encoding: chunked", b"-30\r\n" + b"x" * 30 + b"\r\n0\r\n\r\n"),
        (b"Content-Length: 500", json.dumps(DEMO).encode()),  # then the client stops
    ],
    ids=["chunk-size-not-hex", "chunk-size-negative", "shorter-than-its-length"],
)
def test_a_body_broken_off_is_400_never_500(any_server, framing, body):
    # RFC 9112 §7.1 and §8: a broken or incomplete body is not a body, whoever reads it:
    # the server's own 400, or the app's in the JSON shape, never a 500.
    head = b"POST /login HTTP/1.1\r\nContent-Type: application/json\r\n" + framing
    answer = raw_request(any_server, head, body, stop_sending=True)
    assert answer.split(b"\r\n", 1)[0].split()[1] == b"400", answer


def test_no_answer_names_a_version(any_server):
    # OWASP HTTP Headers Cheat Sheet: a version in Server only helps pick an exploit.
    for path in ("/", "/healthz", "/nowhere"):
        server = urllib_headers(any_server + path).get("Server", "")
        assert not re.search(r"\d|werkzeug|python", server, re.I), server


def urllib_headers(url):
    try:
        with urllib.request.urlopen(url) as response:
            return response.headers
    except urllib.error.HTTPError as error:
        return error.headers


def test_every_answer_says_nosniff_and_personal_ones_no_store(client):
    # OWASP HTTP Headers Cheat Sheet (nosniff); RFC 6749 §5.1 and RFC 9111 (no-store).
    tokens = client.post("/login", json=DEMO).json
    bearer = {"Authorization": f"Bearer {tokens['accessToken']}"}
    personal = [
        client.post("/login", json=DEMO),
        client.post("/login", json=WRONG),
        client.post("/token", json={"refreshToken": tokens["refreshToken"]}),
        client.get("/me", headers=bearer),
        client.get("/sessions", headers=bearer),
        client.get("/me"),
    ]
    others = [
        client.get("/"),
        client.get("/static/app.js"),
        client.get("/openapi.json"),
        client.get("/.well-known/jwks.json"),
        client.get("/healthz"),
        client.get("/favicon.ico"),
        client.get("/nowhere"),
        client.delete("/login"),
        client.post("/login", data="x", content_type="text/plain"),
    ]
    for response in personal + others:
        assert response.headers["X-Content-Type-Options"] == "nosniff", response.request.path
    for response in personal:
        assert response.headers["Cache-Control"] == "no-store", response.request.path
    for response in personal + others:
        response.close()  # the page's file stays open until its answer is closed


def test_a_body_that_is_not_utf_8_is_invalid_json(client):
    # RFC 8259 §8.1: JSON between systems is UTF-8, even where a parser could take UTF-16.
    for encoding in ("utf-16", "utf-32"):
        body = json.dumps(DEMO).encode(encoding)
        response = client.post("/login", data=body, content_type="application/json")
        assert (response.status_code, response.json["error"]) == (400, "invalid_json")


def test_requests_too_broken_for_the_app_get_the_json_shape_and_nosniff(live_server):
    for head in (b"GET /a b HTTP/1.1", b"GET /" + b"a" * 70_000 + b" HTTP/1.1"):
        answer = raw_request(live_server, head)
        status_line, _, rest = answer.partition(b"\r\n")
        assert int(status_line.split()[1]) in (400, 414)
        assert b"X-Content-Type-Options: nosniff" in rest
        assert b"Content-Type: application/json" in rest
        assert b"a b" not in status_line  # the request is never echoed


def test_the_access_log_shows_session_ids_as_prefixes_only(tmp_path):
    port = free_port()
    command = [sys.executable, str(ROOT / "server.py")]
    with serve(command, user_env(PORT=str(port)), tmp_path, port) as (url, log_path):
        tokens = call(url, "POST", "/login", DEMO)[2]
        sid = jwt.decode(tokens["accessToken"], options={"verify_signature": False})["sid"]
        request = urllib.request.Request(f"{url}/sessions/{sid}", method="DELETE")
        request.add_header("Authorization", f"Bearer {tokens['accessToken']}")
        urllib.request.urlopen(request).close()
    log = log_path.read_text()
    assert f"/sessions/{sid[:8]}..." in log
    assert sid not in log


def test_one_address_cannot_lock_an_account_out_for_others(client):
    # NIST SP 800-63B §5.2.2: attempts refused for their email and address do not count
    # against the account, so one address spends at most its own limit on it.
    config = TEST_CONFIG | {
        "LOGIN_RATE_LIMIT": "2 per minute",
        "LOGIN_ACCOUNT_RATE_LIMIT": "5 per day",
    }
    client = create_app(config).test_client()
    attacker = {"REMOTE_ADDR": "198.51.100.66"}
    statuses = [
        client.post("/login", json=WRONG, environ_base=attacker).status_code for _ in range(8)
    ]
    assert statuses == [401, 401] + [429] * 6
    assert (
        client.post("/login", json=DEMO, environ_base={"REMOTE_ADDR": "192.0.2.1"}).status_code
        == 200
    )


def test_a_token_of_ours_with_claims_of_the_wrong_type_is_refused(client):
    # Whoever holds the HS256 access secret (another service) could sign one.
    for sid in ({"a": 1}, 5, ["x"]):
        token = sign("access", claims("access", sid=sid))
        response = client.get("/me", headers={"Authorization": f"Bearer {token}"})
        assert (response.status_code, response.json["error"]) == (401, "invalid_token")


# Claims a signer could put in a token that PyJWT lets through: a NumericDate as a string
# (PyJWT takes int("...")), and an id with a lone surrogate, which no store can write.
HOSTILE_CLAIMS = [
    {"exp": str(now() + 900)}, {"iat": str(now())}, {"exp": float(now() + 900.5)},
    {"sid": "\ud800"}, {"sub": "\udfff"}, {"jti": "a\ud800b"}, {"sid": "x" * 5000},
]  # fmt: skip
HOSTILE_IDS = [
    "exp-text", "iat-text", "exp-fraction", "sid-surrogate", "sub-surrogate", "jti-surrogate",
    "sid-5000",
]  # fmt: skip


@pytest.mark.parametrize("store", ["memory", "redis"])
@pytest.mark.parametrize("changes", HOSTILE_CLAIMS, ids=HOSTILE_IDS)
def test_a_signed_token_with_hostile_claims_is_refused_never_a_500(store, changes, request):
    # Whoever holds a secret (another service holds the HS256 access one) could sign these.
    on_redis = {"REDIS_URL": request.getfixturevalue("redis_url")} if store == "redis" else {}
    client = create_app(TEST_CONFIG | on_redis).test_client()
    access = {"Authorization": f"Bearer {sign('access', claims('access', **changes))}"}
    refresh = {"refreshToken": sign("refresh", claims("refresh", **changes))}
    answers = [
        client.get("/me", headers=access), client.get("/sessions", headers=access),
        client.post("/token", json=refresh), client.post("/logout", json=refresh),
    ]  # fmt: skip
    float_exp = isinstance(changes.get("exp"), float)  # a JSON number: refused only by the store
    assert [answer.status_code for answer in answers] == [401, 401, 403, 204], changes
    for answer in answers[:3]:
        error = answer.get_json()["error"]
        assert error == ("invalid_refresh_token" if answer is answers[2] else "invalid_token")
        if not float_exp and "x" * 5000 not in str(changes):
            assert "claims are not of the right type" in answer.get_json()["message"]


@pytest.mark.parametrize("limit", ["2 per minute; 1000 per day", "", "nonsense"])
def test_a_limit_setting_holds_exactly_one_limit(limit):
    from settings import ConfigError, load_settings

    if limit == "":
        assert load_settings({"LOGIN_RATE_LIMIT": limit}, logging.getLogger("test"))  # default
        return
    with pytest.raises(ConfigError, match="LOGIN_RATE_LIMIT"):
        load_settings({"LOGIN_RATE_LIMIT": limit}, logging.getLogger("test"))
