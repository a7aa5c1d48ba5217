import io
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jwt
import pytest
import time_machine
from flask.json.provider import DefaultJSONProvider
from hypothesis import given
from hypothesis import strategies as st
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Response

from server import create_app
from web import audit, page_address

from .conftest import (
    ACCESS_SECRET,
    DEMO,
    DEMO_ID,
    PRODUCTION,
    REFRESH_SECRET,
    ROOT,
    TEST_CONFIG,
    AuthActions,
    audit_records,
    call,
    free_port,
    refresh_body,
    released_together,
    run_server,
    serve,
    user_env,
)

TOKEN_FIELDS = {"accessToken", "refreshToken", "tokenType", "expiresIn"}
INVALID_CREDENTIALS = {
    "error": "invalid_credentials",
    "message": "The email or password is incorrect.",
}


# --- login ---------------------------------------------------------------------------------


def test_login_returns_both_tokens(auth_actions):
    response = auth_actions.login()
    assert response.status_code == 200
    assert response.json.keys() == TOKEN_FIELDS
    assert response.json["tokenType"] == "Bearer"
    assert response.json["expiresIn"] == 900
    assert response.headers["Cache-Control"] == "no-store"


def test_expires_in_follows_the_setting(client):
    app = create_app(TEST_CONFIG | {"ACCESS_TOKEN_TTL": "60"})
    response = app.test_client().post("/login", json=DEMO)
    assert response.json["expiresIn"] == 60
    claims = jwt.decode(response.json["accessToken"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 60


def test_refresh_token_lifetime_follows_the_setting(auth_actions):
    claims = jwt.decode(auth_actions.tokens()["refreshToken"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 1_209_600


@pytest.mark.parametrize(
    "email, password",
    [("demo@example.com", "wrong-password"), ("nobody@example.com", "demo-password")],
)
def test_wrong_password_and_unknown_email_look_the_same(auth_actions, email, password):
    response = auth_actions.login(email, password)
    assert response.status_code == 401
    assert response.json == INVALID_CREDENTIALS


def test_email_is_case_insensitive(auth_actions):
    assert auth_actions.login("DEMO@Example.COM").status_code == 200


def test_two_logins_in_one_second_get_distinct_tokens(auth_actions):
    with time_machine.travel(time.time(), tick=False):
        first, second = auth_actions.tokens(), auth_actions.tokens()
    assert first["refreshToken"] != second["refreshToken"]
    assert first["accessToken"] != second["accessToken"]
    auth_actions.logout(first["refreshToken"])
    assert auth_actions.refresh(second["refreshToken"]).status_code == 200


# --- /token --------------------------------------------------------------------------------


def test_refresh_returns_a_new_pair_and_spends_the_old_token(auth_actions):
    tokens = auth_actions.tokens()
    response = auth_actions.refresh(tokens["refreshToken"])
    assert response.status_code == 200
    assert response.json.keys() == TOKEN_FIELDS
    assert response.headers["Cache-Control"] == "no-store"
    assert response.json["refreshToken"] != tokens["refreshToken"]
    assert auth_actions.me(response.json["accessToken"]).status_code == 200
    with time_machine.travel(time.time() + 11):  # past the reuse grace window
        assert auth_actions.refresh(tokens["refreshToken"]).status_code == 403


def test_unknown_refresh_token_is_refused(auth_actions):
    # Same secrets, but issued by another process: its session is not in this store.
    other = create_app(TEST_CONFIG).test_client().post("/login", json=DEMO).json
    response = auth_actions.refresh(other["refreshToken"])
    assert response.status_code == 403
    assert response.json == {
        "error": "invalid_refresh_token",
        "message": "This refresh token's session has ended. Log in again.",
    }


def test_logged_out_refresh_token_is_refused(auth_actions):
    tokens = auth_actions.tokens()
    auth_actions.logout(tokens["refreshToken"])
    assert auth_actions.refresh(tokens["refreshToken"]).status_code == 403


def test_expired_refresh_token_is_refused(auth_actions):
    tokens = auth_actions.tokens()
    with time_machine.travel(time.time() + 1_209_600 + 60):
        response = auth_actions.refresh(tokens["refreshToken"])
    assert response.status_code == 403
    assert response.json["message"] == (
        "The refresh token is not valid: the token has expired. Log in again."
    )


@pytest.mark.parametrize(
    "token", ["not-a-jwt", "a.b.c", "", "eyJhbGciOiJIUzI1NiJ9.e30.c2ln"], ids=repr
)
def test_malformed_refresh_token_is_refused(auth_actions, token):
    response = auth_actions.refresh(token)
    assert response.status_code == 403
    assert response.json["error"] == "invalid_refresh_token"


def test_badly_signed_refresh_token_is_refused(auth_actions):
    claims = jwt.decode(auth_actions.tokens()["refreshToken"], options={"verify_signature": False})
    header = jwt.get_unverified_header(auth_actions.tokens()["refreshToken"])
    forged = jwt.encode(claims, "x" * 32 + "-not-our-secret", headers=header)
    response = auth_actions.refresh(forged)
    assert response.status_code == 403
    assert response.json["message"] == (
        "The refresh token is not valid: the token's signature does not match. Log in again."
    )


# --- /logout -------------------------------------------------------------------------------


def test_logout_ends_the_session(auth_actions):
    tokens = auth_actions.tokens()
    response = auth_actions.logout(tokens["refreshToken"])
    assert response.status_code == 204
    assert response.data == b""
    assert auth_actions.refresh(tokens["refreshToken"]).status_code == 403


@pytest.mark.parametrize("token", ["never-issued", "a.b.c"])
def test_logout_is_idempotent_for_unknown_tokens(auth_actions, token):
    assert auth_actions.logout(token).status_code == 204


def test_logout_twice(auth_actions):
    tokens = auth_actions.tokens()
    assert auth_actions.logout(tokens["refreshToken"]).status_code == 204
    assert auth_actions.logout(tokens["refreshToken"]).status_code == 204


# --- /me -----------------------------------------------------------------------------------


def test_me_returns_the_user(auth_actions):
    response = auth_actions.me(auth_actions.tokens()["accessToken"])
    assert response.status_code == 200
    assert response.json == {"id": DEMO_ID, "email": "demo@example.com"}


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwdw=="])
def test_me_without_a_bearer_token_gets_the_challenge(client, header):
    response = client.get("/me", headers={"Authorization": header} if header is not None else {})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    assert response.json == {
        "error": "missing_token",
        "message": "Send an access token in the 'Authorization: Bearer <token>' header.",
    }


def test_me_with_a_bad_token(auth_actions):
    response = auth_actions.me("not-a-token")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert response.json == {
        "error": "invalid_token",
        "message": "The access token is not valid: the token is malformed. "
        "Log in or refresh to get a new one.",
    }


def test_me_with_an_expired_token(auth_actions):
    access = auth_actions.tokens()["accessToken"]
    with time_machine.travel(time.time() + 901 + 5):
        response = auth_actions.me(access)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert response.json["message"] == (
        "The access token is not valid: the token has expired. Log in or refresh to get a new one."
    )


def test_bearer_scheme_is_case_insensitive(auth_actions, client):
    access = auth_actions.tokens()["accessToken"]
    assert client.get("/me", headers={"Authorization": f"bearer {access}"}).status_code == 200


# --- bad input -----------------------------------------------------------------------------

TOO_LARGE = json.dumps({"email": "x" * 70_000, "password": "p"})


@pytest.mark.parametrize("path", ["/login", "/token", "/logout"])
@pytest.mark.parametrize(
    "data, content_type, status, body",
    [
        (
            "{not json",
            "application/json",
            400,
            {"error": "invalid_json", "message": "The request body is not valid JSON."},
        ),
        (
            '{"email": "a@example.com", "password": "x", "n": NaN}',
            "application/json",
            400,
            {"error": "invalid_json", "message": "The request body is not valid JSON."},
        ),
        (
            "[1, 2]",
            "application/json",
            400,
            {"error": "invalid_body", "message": "The request body must be a JSON object."},
        ),
        (
            "null",
            "application/json",
            400,
            {"error": "invalid_body", "message": "The request body must be a JSON object."},
        ),
        (
            "email=a&password=b",
            "application/x-www-form-urlencoded",
            415,
            {
                "error": "unsupported_media_type",
                "message": "Send a JSON body with 'Content-Type: application/json'.",
            },
        ),
        (
            TOO_LARGE,
            "application/json",
            413,
            {
                "error": "request_entity_too_large",
                "message": "The request body is over 64 KiB.",
            },
        ),
    ],
    ids=["malformed", "nan", "array", "null", "form", "too-large"],
)
def test_bad_bodies(client, path, data, content_type, status, body):
    response = client.post(path, data=data, content_type=content_type)
    assert (response.status_code, response.json) == (status, body)


FRAMINGS = ["content-length", "content-length-terminated", "chunked"]


def framed(body, framing):
    """The test client's arguments for a body sent with a Content-Length, as the development
    server passes it on (the input ends nowhere: Werkzeug's stream stops at the length) or as
    granian does (the input ends with the body); or chunked as a server passes one on: no
    Content-Length, the input terminated."""
    if framing == "content-length":
        return {"data": body}
    if framing == "content-length-terminated":
        return {"data": body, "environ_overrides": {"wsgi.input_terminated": True}}
    return {
        "input_stream": io.BytesIO(body),
        "headers": {"Transfer-Encoding": "chunked"},
        "environ_overrides": {"wsgi.input_terminated": True},
    }


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize(("size", "status"), [(64 * 1024, 400), (64 * 1024 + 1, 413)])
def test_a_body_of_64_kib_is_read_and_one_byte_more_is_413(client, framing, size, status):
    body = b"{" + b" " * (size - 2) + b"}"  # {}: read whole, it lacks its fields
    response = client.post("/login", content_type="application/json", **framed(body, framing))
    assert response.status_code == status
    assert response.json["error"] == (
        "invalid_field" if status == 400 else "request_entity_too_large"
    )


class BrokenInput(io.RawIOBase):
    """A server's input that fails mid-body, as a chunked body with broken framing does in
    Werkzeug's development server (its DechunkedInput raises OSError)."""

    def readable(self):
        return True

    def readinto(self, buffer):
        raise OSError("Invalid chunk header")


@pytest.mark.parametrize(
    ("stream", "length"),
    [
        (lambda: io.BufferedReader(BrokenInput()), "10"),
        (lambda: io.BytesIO(json.dumps(DEMO).encode()), "500"),
    ],
    ids=["broken-chunks", "shorter-than-its-length"],
)
@pytest.mark.parametrize("terminated", [True, False], ids=["server-ends-input", "werkzeug-ends"])
def test_a_body_broken_off_is_400_never_500(app, stream, length, terminated):
    # RFC 9112 §7.1 and §8: a body whose framing breaks, or that ends before its
    # Content-Length, is incomplete: answered as Werkzeug's own stream answers it.
    environ = EnvironBuilder("/login", method="POST", content_type="application/json").get_environ()
    environ |= {"wsgi.input": stream(), "CONTENT_LENGTH": length}
    if terminated:
        environ["wsgi.input_terminated"] = True
    response = Response.from_app(app, environ)
    assert (response.status_code, response.json["error"]) == (400, "bad_request")


@pytest.mark.parametrize(
    ("method", "path", "content_type"),
    [("GET", "/me", "application/json"), ("POST", "/login", "text/plain"),
     ("POST", "/introspect", "application/json"), ("GET", "/healthz", None)],
)  # fmt: skip
@pytest.mark.parametrize("framing", FRAMINGS)
def test_any_body_over_64_kib_is_413_on_any_route_whatever_its_type(
    client, method, path, content_type, framing
):
    # Before anything else is checked: the size is the first thing a body is refused for.
    body = b"x" * (64 * 1024 + 1)
    response = client.open(path, method=method, content_type=content_type, **framed(body, framing))
    assert (response.status_code, response.json["error"]) == (413, "request_entity_too_large")


@pytest.mark.parametrize(
    "path, payload, field",
    [
        ("/login", {"password": "demo-password"}, "email"),
        ("/login", {"email": "demo@example.com"}, "password"),
        ("/login", {"email": 7, "password": "demo-password"}, "email"),
        ("/login", {"email": "demo@example.com", "password": None}, "password"),
        ("/token", {}, "refreshToken"),
        ("/token", {"refreshToken": ["a"]}, "refreshToken"),
        ("/logout", {}, "refreshToken"),
        ("/logout", {"refreshToken": {"a": 1}}, "refreshToken"),
    ],
)
def test_missing_or_non_string_fields(client, path, payload, field):
    response = client.post(path, json=payload)
    assert response.status_code == 400
    assert response.json == {
        "error": "invalid_field",
        "message": f"The field '{field}' must be a string.",
    }


def test_unknown_route_is_json_404(client):
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert response.json["error"] == "not_found"


@pytest.mark.parametrize("method, path", [("get", "/login"), ("delete", "/token"), ("post", "/me")])
def test_wrong_method_is_json_405(client, method, path):
    response = getattr(client, method)(path)
    assert response.status_code == 405
    assert response.json == {
        "error": "method_not_allowed",
        "message": "The method is not allowed for the requested URL.",
    }
    assert "Allow" in response.headers


# --- the real process ----------------------------------------------------------------------


def test_real_process_walkthrough(live_server):
    status, headers, tokens = call(live_server, "POST", "/login", DEMO)
    assert status == 200 and headers["Cache-Control"] == "no-store"
    assert call(live_server, "GET", "/me", token=tokens["accessToken"])[2] == {
        "id": DEMO_ID,
        "email": "demo@example.com",
    }
    status, _, renewed = call(
        live_server, "POST", "/token", {"refreshToken": tokens["refreshToken"]}
    )
    assert status == 200 and renewed.keys() == TOKEN_FIELDS
    assert call(live_server, "POST", "/logout", {"refreshToken": renewed["refreshToken"]})[0] == 204
    status, _, error = call(
        live_server, "POST", "/token", {"refreshToken": renewed["refreshToken"]}
    )
    assert status == 403 and error["error"] == "invalid_refresh_token"
    status, _, error = call(live_server, "POST", "/login", {"email": 1})
    assert status == 400 and error["error"] == "invalid_field"
    # The access token died with its session at logout.
    assert call(live_server, "GET", "/me", token=renewed["accessToken"])[0] == 401


def test_flask_run_works_too(tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "flask", "--app", "server", "run", "--port", str(port)]
    with serve(command, user_env(), tmp_path, port) as (url, _):
        assert call(url, "POST", "/login", DEMO)[0] == 200


# --- the session lifecycle (RFC 9700 §4.14.2) ------------------------------------------------


def test_reusing_a_spent_token_ends_the_session(auth_actions):
    first = auth_actions.tokens()
    second = auth_actions.refresh(first["refreshToken"]).json
    other_session = auth_actions.tokens()
    with time_machine.travel(time.time() + 11):  # past the reuse grace window
        response = auth_actions.refresh(first["refreshToken"])
    assert (response.status_code, response.json) == (
        403,
        {
            "error": "invalid_refresh_token",
            "message": "This refresh token was already used, so the session was ended. "
            "Log in again.",
        },
    )
    assert auth_actions.refresh(second["refreshToken"]).status_code == 403
    assert auth_actions.refresh(other_session["refreshToken"]).status_code == 200


def test_rotation_keeps_the_session_expiry(auth_actions):
    login_time = time.time()
    with time_machine.travel(login_time, tick=False):
        tokens = auth_actions.tokens()
    with time_machine.travel(login_time + 6 * 86_400, tick=False):
        rotated = auth_actions.refresh(tokens["refreshToken"]).json
    with time_machine.travel(login_time + 12 * 86_400, tick=False):  # idle: at most 7 days
        rotated = auth_actions.refresh(rotated["refreshToken"]).json
    first, later = (
        jwt.decode(token["refreshToken"], options={"verify_signature": False})
        for token in (tokens, rotated)
    )
    assert later["exp"] == first["exp"] == int(login_time) + 1_209_600
    with time_machine.travel(login_time + 1_209_600 + 60):
        assert auth_actions.refresh(rotated["refreshToken"]).status_code == 403


def test_logout_after_rotations_ends_the_session(auth_actions):
    tokens = auth_actions.tokens()
    for _ in range(3):
        tokens = auth_actions.refresh(tokens["refreshToken"]).json
    assert auth_actions.logout(tokens["refreshToken"]).status_code == 204
    assert auth_actions.refresh(tokens["refreshToken"]).status_code == 403


def test_logout_with_a_spent_token_of_the_session_ends_it(auth_actions):
    first = auth_actions.tokens()
    latest = auth_actions.refresh(first["refreshToken"]).json
    assert auth_actions.logout(first["refreshToken"]).status_code == 204
    assert auth_actions.refresh(latest["refreshToken"]).status_code == 403


def test_logout_ignores_an_invalid_access_token(auth_actions):
    tokens = auth_actions.tokens()
    assert auth_actions.logout(tokens["refreshToken"], "not-a-token").status_code == 204
    assert auth_actions.refresh(tokens["refreshToken"]).status_code == 403


def test_sixteen_simultaneous_refreshes_without_grace_have_one_winner(start_server):
    live_server = start_server(REFRESH_REUSE_GRACE="0")
    tokens = call(live_server, "POST", "/login", DEMO)[2]
    barrier = threading.Barrier(16)

    def refresh_once(_):
        barrier.wait()
        return call(live_server, "POST", "/token", refresh_body(tokens))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(refresh_once, range(16)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] + [403] * 15
    winner = next(body for status, _, body in results if status == 200)
    # The losers were reuse, so the session ended and the winner's token died with it.
    assert call(live_server, "POST", "/token", refresh_body(winner))[0] == 403


# --- login throttling (OWASP Authentication Cheat Sheet) -----------------------------------


def test_failed_logins_are_throttled_per_email_and_address(auth_actions):
    for _ in range(10):
        assert auth_actions.login(password="wrong").status_code == 401
    response = auth_actions.login(password="wrong")
    assert response.status_code == 429
    assert response.json["error"] == "too_many_requests"
    assert response.json["message"].startswith("Too many failed logins")
    assert 899 <= int(response.headers["Retry-After"]) <= 901  # the 15-minute window, rounded
    # The right password does not get through either, for that email from that address...
    assert auth_actions.login().status_code == 429
    # ...but another email, or the same email from another address, is not locked out.
    assert auth_actions.login("someone@example.com", "wrong").status_code == 401
    other_address = {"environ_base": {"REMOTE_ADDR": "192.0.2.7"}}
    assert auth_actions.login(**other_address).status_code == 200


def test_successful_logins_are_not_counted(auth_actions):
    for _ in range(12):
        assert auth_actions.login().status_code == 200


def test_throttling_ends_when_the_window_passes():
    start = time.time()
    with time_machine.travel(start, tick=False):
        client = create_app(TEST_CONFIG | {"LOGIN_RATE_LIMIT": "3 per minute"}).test_client()
        for _ in range(3):
            assert client.post("/login", json=DEMO | {"password": "wrong"}).status_code == 401
        response = client.post("/login", json=DEMO)
        assert response.status_code == 429
        assert response.headers["Retry-After"] in ("60", "61")  # the window, rounded up
    with time_machine.travel(start + 61, tick=False):
        assert client.post("/login", json=DEMO).status_code == 200


# --- the audit log -------------------------------------------------------------------------


def test_security_events_are_audited_without_secrets(capsys):
    client = create_app(TEST_CONFIG | {"LOGIN_RATE_LIMIT": "1 per minute"}).test_client()
    actions = AuthActions(client)
    tokens = actions.tokens()
    rotated = actions.refresh(tokens["refreshToken"]).json
    actions.refresh(tokens["refreshToken"])  # within the grace window: replayed
    with time_machine.travel(time.time() + 11):
        actions.refresh(tokens["refreshToken"])  # reuse
    again = actions.tokens()
    actions.logout(again["refreshToken"])
    actions.login(password="wrong")
    actions.login(password="wrong")  # throttled
    stderr = capsys.readouterr().err
    records = audit_records(stderr)
    assert [record["audit"] for record in records] == [
        "login_succeeded",
        "refreshed",
        "refresh_replayed",
        "session_ended",
        "login_succeeded",
        "logout",
        "session_ended",
        "login_failed",
        "login_throttled",
    ]
    reuse = records[3]
    assert reuse["reason"] == "reuse" and reuse["user"] == DEMO_ID and reuse["ip"] == "127.0.0.1"
    assert records[6]["reason"] == "logout_local" and records[5]["scope"] == "local"
    assert records[8]["limit"] == "email_address"
    assert all(len(record.get("session", "")) <= 8 for record in records)  # prefixes only
    for secret in [*tokens.values(), *rotated.values(), *again.values(), "wrong", "demo-password"]:
        if isinstance(secret, str) and secret not in ("Bearer",):
            assert secret not in stderr
    assert ACCESS_SECRET not in stderr and REFRESH_SECRET not in stderr


def test_audit_lines_written_at_once_from_many_threads_stay_whole(app, capsys):
    def write(n):
        with app.test_request_context("/", environ_base={"REMOTE_ADDR": "127.0.0.1"}):
            for i in range(200):
                audit("refreshed", user=f"user-{n}", session=f"{i:08d}")

    released_together(16, write)
    records = audit_records(capsys.readouterr().err)
    assert len(records) == 16 * 200
    assert {(r["user"], r["session"]) for r in records} == {
        (f"user-{n}", f"{i:08d}") for n in range(16) for i in range(200)
    }


# --- a shared store: Redis ------------------------------------------------------------------


@pytest.fixture
def redis_config(redis_url, redis_client):
    return TEST_CONFIG | {"REDIS_URL": redis_url}


def test_sessions_survive_a_restart_with_redis(redis_config):
    before = AuthActions(create_app(redis_config).test_client()).tokens()
    after_restart = AuthActions(create_app(redis_config).test_client())
    assert after_restart.refresh(before["refreshToken"]).status_code == 200


def test_a_logout_reaches_every_worker_with_redis(redis_config):
    tokens = AuthActions(create_app(redis_config).test_client()).tokens()
    other_worker = AuthActions(create_app(redis_config).test_client())
    other_worker.logout(tokens["refreshToken"])
    assert (
        AuthActions(create_app(redis_config).test_client()).me(tokens["accessToken"]).status_code
        == 401
    )


def test_login_throttling_is_shared_with_redis(redis_config):
    config = redis_config | {"LOGIN_RATE_LIMIT": "3 per minute"}
    workers = [AuthActions(create_app(config).test_client()) for _ in range(3)]
    for worker in workers:
        assert worker.login(password="wrong").status_code == 401
    assert AuthActions(create_app(config).test_client()).login().status_code == 429


def test_health_of_the_memory_store(client):
    response = client.get("/healthz")
    assert (response.status_code, response.json) == (200, {"status": "ok", "store": "memory"})


UNREACHABLE = TEST_CONFIG | {"REDIS_URL": "redis://127.0.0.1:1/0"}


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("post", "/login", DEMO),
        ("post", "/token", {"refreshToken": "x"}),
        ("post", "/logout", {"refreshToken": "x"}),
        ("get", "/healthz", None),
    ],
)
def test_unreachable_redis_is_a_503_never_a_500(method, path, body):
    client = create_app(UNREACHABLE).test_client()
    if path in ("/token", "/logout"):  # a valid token, so the store is asked
        body = {"refreshToken": valid_refresh_token()}
    response = getattr(client, method)(path, json=body)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert response.json == {
        "error": "store_unavailable",
        "message": "The session store is not answering. Try again in a few seconds.",
    }


def test_me_fails_closed_when_the_store_is_unreachable():
    access = AuthActions(create_app(TEST_CONFIG).test_client()).tokens()["accessToken"]
    response = AuthActions(create_app(UNREACHABLE).test_client()).me(access)
    assert response.status_code == 503


def valid_refresh_token():
    """A refresh token signed with the test secrets, from an app with a working store."""
    return AuthActions(create_app(TEST_CONFIG).test_client()).tokens()["refreshToken"]


# --- the answers' bytes and headers --------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(value=JSON_VALUES)
def test_json_answers_are_the_bytes_flask_gives(value):
    # web.CompactJSON builds its encoder once; what it writes is Flask's, byte for byte.
    app = create_app(TEST_CONFIG)
    with app.app_context():
        ours, flasks = app.json.response(value), DefaultJSONProvider(app).response(value)
    assert ours.get_data() == flasks.get_data()
    assert ours.headers == flasks.headers


def test_json_answers_in_debug_mode_are_indented_as_flasks():
    app = create_app(TEST_CONFIG)
    app.debug = True
    with app.app_context():
        ours = app.json.response(id="u1", sessions=[{"current": True}])
        assert (
            ours.get_data()
            == DefaultJSONProvider(app).response(id="u1", sessions=[{"current": True}]).get_data()
        )
    assert ours.get_data().startswith(b"{\n  ")


def test_answers_without_content_carry_no_type_and_each_header_once(client, auth_actions):
    tokens = auth_actions.tokens()
    no_content = [auth_actions.logout(tokens["refreshToken"]), client.get("/favicon.ico")]
    for response in no_content:  # RFC 9110 §15.3.5: no content, so no type
        assert response.status_code == 204 and "Content-Type" not in response.headers
    jwks = client.get("/.well-known/jwks.json")  # a route that says how long to cache
    for response in [*no_content, jwks, client.post("/token", json=refresh_body(tokens))]:
        assert response.headers.getlist("X-Content-Type-Options") == ["nosniff"]
        assert len(response.headers.getlist("Cache-Control")) == 1
    assert jwks.headers["Cache-Control"] != "no-store"


# --- behind a proxy ----------------------------------------------------------------------


def test_forwarded_headers_count_only_from_trusted_proxies():
    # OWASP: X-Forwarded-For is any client's to forge unless a proxy we trust sets it.
    forged = {"X-Forwarded-For": "203.0.113.9"}
    for proxies, expected in (("0", "127.0.0.1"), ("1", "203.0.113.9")):
        client = create_app(TEST_CONFIG | {"TRUSTED_PROXIES": proxies}).test_client()
        tokens = client.post("/login", json=DEMO, headers=forged).json
        bearer = {"Authorization": f"Bearer {tokens['accessToken']}"}
        assert client.get("/sessions", headers=bearer).json["sessions"][0]["ip"] == expected


def test_behind_a_tls_proxy_the_page_origin_is_https():
    client = create_app(TEST_CONFIG | {"TRUSTED_PROXIES": "1"}).test_client()
    https = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "auth.example.com"}
    response = client.post("/login", json=DEMO | {"refreshTokenTransport": "cookie"}, headers=https)
    csrf = client.get_cookie("csrf_token").value
    headers = https | {"Origin": "https://auth.example.com", "X-CSRF-Token": csrf}
    response = client.post("/token", json={"refreshTokenTransport": "cookie"}, headers=headers)
    assert response.status_code == 200, response.json


HSTS = "max-age=31536000; includeSubDomains"


@pytest.mark.parametrize("path", ["/healthz", "/", "/nowhere", "/me"])
def test_answers_that_came_over_https_carry_hsts(path):
    # RFC 6797 and ASVS 5.0 V3.4.1: a year, subdomains included, behind a TLS proxy.
    app = create_app(
        PRODUCTION | {"TRUSTED_PROXIES": "1", "DEMO_USER_PASSWORD": "a long chosen password"}
    )
    response = app.test_client().get(path, headers={"X-Forwarded-Proto": "https"})
    response.close()  # the page's answer holds its file open until closed
    assert response.headers["Strict-Transport-Security"] == HSTS


@pytest.mark.parametrize(
    "proxies, headers",
    [("1", {}), ("1", {"X-Forwarded-Proto": "http"}), ("0", {"X-Forwarded-Proto": "https"})],
)
def test_plain_http_answers_never_carry_hsts(proxies, headers):
    # RFC 6797 §7.2: never over plain HTTP; an untrusted X-Forwarded-Proto counts for nothing.
    app = create_app(TEST_CONFIG | {"TRUSTED_PROXIES": proxies})
    response = app.test_client().get("/healthz", headers=headers)
    assert "Strict-Transport-Security" not in response.headers


# --- python server.py's start --------------------------------------------------------------

# Runs server.py with every socket that web.serve closes held open a second first: the moment
# between its look at the port and the server's own socket, stretched for a client to meet.
SLOW_START = """
import runpy, socket, sys, time
def hold(frame, event, arg):
    if event == "call" and frame.f_code is socket.socket.close.__code__:
        caller = frame.f_back
        while caller and caller.f_code.co_name != "serve":
            caller = caller.f_back
        if caller and caller.f_code.co_filename.endswith("web.py"):
            time.sleep(1)
sys.setprofile(hold)
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def test_a_client_that_connects_while_the_server_starts_is_answered_never_reset(tmp_path):
    port = free_port()
    command = [sys.executable, "-c", SLOW_START, str(ROOT / "server.py")]
    env = user_env(**TEST_CONFIG, PORT=str(port))
    log = tmp_path / "server.log"
    with open(log, "w") as stderr:
        server = subprocess.Popen(command, env=env, cwd=tmp_path, stderr=stderr)
    try:
        deadline = time.monotonic() + 30
        while True:  # as a readiness probe does: connect at once, and send at once
            assert server.poll() is None, log.read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                    client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    answer = b"".join(iter(lambda: client.recv(4096), b""))
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert answer.startswith(b"HTTP/1.1 200 ")
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize(
    ("host", "shown"),
    [
        ("127.0.0.1", "http://127.0.0.1:3000/"),
        ("0.0.0.0", "http://127.0.0.1:3000/"),  # every interface: this machine's is one
        ("::", "http://[::1]:3000/"),
        ("::1", "http://[::1]:3000/"),  # RFC 3986 §3.2.2: an IPv6 address in brackets
        ("localhost", "http://localhost:3000/"),
    ],
)
def test_the_address_to_open_is_a_url_a_browser_takes(host, shown):
    assert page_address(host, 3000) == shown


def test_a_port_in_use_stops_the_start_with_one_plain_line(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_server(TEST_CONFIG | {"PORT": str(port)}, tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{port} (Address already in use); set PORT to another."
    )
    assert "Traceback" not in result.stderr and "Open http" not in result.stderr


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("192.0.2.1", "Cannot assign requested address"),  # RFC 5737: no machine's address
        ("no-such-host.invalid", "Name or service not known"),  # RFC 6761: never resolves
    ],
)
def test_a_host_not_of_this_machine_stops_the_start_naming_host(tmp_path, host, reason):
    result = run_server(TEST_CONFIG | {"HOST": host, "PORT": "3000"}, tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot listen on {host}:3000 ({reason}); set HOST to an address of this machine."
    )
    assert "Traceback" not in result.stderr
