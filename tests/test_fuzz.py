"""Fuzz every route: whatever body, headers and cookies arrive, the answer is never a 500.

Hypothesis draws hostile JSON (deep, huge, odd types, lone surrogates), bytes that are not
UTF-8, and header and cookie values with any byte a client can send. Every answer must be a
success or a 4xx (503 only for a busy login), and every error must have the one JSON shape.
The in-process run goes wide; the run against `python server.py` sends raw bytes that no
HTTP library would send.
"""

import base64
import json
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server import create_app

from .conftest import DEMO, TEST_CONFIG

ROUTES = [
    ("POST", "/login"),
    ("POST", "/token"),
    ("POST", "/logout"),
    ("GET", "/me"),
    ("GET", "/sessions"),
    ("DELETE", "/sessions/some-id"),
    ("POST", "/password"),
    ("POST", "/introspect"),
    ("GET", "/.well-known/jwks.json"),
    ("GET", "/healthz"),
    ("GET", "/openapi.json"),
    ("GET", "/"),
]
# Every value a header can carry: Latin-1 text without control characters, as HTTP allows.
HEADER_TEXT = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=80
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Mostly JSON, so that most examples get past the media type to the routes' own checks.
CONTENT_TYPES = ["application/json"] * 8 + ["text/plain", "application/x-www-form-urlencoded"]
FIELDS = ["email", "password", "refreshToken", "refreshTokenTransport", "scope"]
FIELDS += ["currentPassword", "newPassword"]


def b64(value):
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


# Tokens whose header and payload are any JSON at all: the shapes a forger controls.
FORGED = st.tuples(
    JSON_VALUES
    | st.dictionaries(st.sampled_from(["typ", "kid", "alg", "crit", "b64"]), JSON_VALUES),
    JSON_VALUES,
).map(lambda parts: f"{b64(parts[0])}.{b64(parts[1])}.c2ln")


def surrogate_text(text):
    """JSON that escapes a lone surrogate: valid JSON, but not valid text."""
    return json.dumps({"email": text + "\ud800", "password": text}).encode()


def bodies(tokens):
    """Strategies for request bodies, some carrying real tokens so the routes go deeper."""
    field_values = (
        JSON_VALUES | FORGED | st.sampled_from([*tokens, "cookie", "body", "global", "others"])
    )
    objects = st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=5)
    cookie_transport = st.sampled_from(["local", "others", "global", None]).map(
        lambda scope: json.dumps({"refreshTokenTransport": "cookie", "scope": scope}).encode()
    )
    return st.one_of(
        cookie_transport,
        cookie_transport,
        st.binary(max_size=200),
        JSON_VALUES.map(lambda value: json.dumps(value).encode()),
        objects.map(lambda value: json.dumps(value).encode()),
        st.integers(1, 50_000).map(lambda depth: b"[" * depth + b"]" * depth),
        st.integers(1, 5000).map(lambda digits: b'{"email": ' + b"9" * digits + b"}"),
        st.text(max_size=20).map(surrogate_text),
    )


def headers(tokens):
    authorization = (
        HEADER_TEXT
        | st.sampled_from([f"Bearer {t}" for t in tokens])
        | HEADER_TEXT.map("Bearer {}".format)
    )
    return st.fixed_dictionaries(
        {"Content-Type": st.sampled_from(CONTENT_TYPES) | HEADER_TEXT},
        optional={
            "Authorization": authorization,
            "X-CSRF-Token": HEADER_TEXT,
            "Origin": st.just("http://localhost") | HEADER_TEXT,
            "User-Agent": HEADER_TEXT,
            "Cookie": st.lists(
                st.tuples(st.sampled_from(["refresh_token", "csrf_token", "x"]), HEADER_TEXT),
                max_size=3,
            ).map(lambda pairs: "; ".join(f"{k}={v}" for k, v in pairs)),
        },
    )


@pytest.fixture(scope="module")
def fuzzed_app():
    config = TEST_CONFIG | {
        "INTROSPECTION_CLIENTS": "fuzz:fuzz-client-secret-0123456789",
        "LOGIN_RATE_LIMIT": "1000 per minute",
        "LOGIN_ADDRESS_RATE_LIMIT": "1000 per minute",
    }
    app = create_app(config)
    tokens = app.test_client().post("/login", json=DEMO).json
    return app, [tokens["accessToken"], tokens["refreshToken"]]


@pytest.fixture(scope="module")
def request_parts(fuzzed_app):
    """The strategies of a request's headers and body, made once: Hypothesis then checks and
    measures each strategy once, not again at every example."""
    _, tokens = fuzzed_app
    return headers(tokens), bodies(tokens)


def assert_answer_is_sound(status, content_type, body):
    assert status < 500 or status == 503, (status, body[:200])
    if status >= 400:
        assert content_type == "application/json"
        assert set(json.loads(body)) == {"error", "message"}


@pytest.mark.parametrize("method, path", ROUTES)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_no_input_to_any_route_is_a_500(fuzzed_app, request_parts, method, path, data):
    app, _ = fuzzed_app
    any_headers, any_body = request_parts
    sent_headers = data.draw(any_headers)
    body = data.draw(any_body) if method != "GET" else b""
    with app.test_client().open(path, method=method, headers=sent_headers, data=body) as response:
        assert_answer_is_sound(response.status_code, response.mimetype, response.get_data())


@pytest.mark.parametrize("path", ["/token", "/logout"])
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    csrf=HEADER_TEXT, cookie_csrf=HEADER_TEXT, refresh=HEADER_TEXT, origin=st.none() | HEADER_TEXT
)
def test_any_value_in_the_headers_and_cookies_the_browser_flow_reads(
    fuzzed_app, path, csrf, cookie_csrf, refresh, origin
):
    app, _ = fuzzed_app
    client = app.test_client()
    client.set_cookie("csrf_token", cookie_csrf)
    client.set_cookie("refresh_token", refresh, path=path)
    sent = {"X-CSRF-Token": csrf} | ({"Origin": origin} if origin is not None else {})
    body = {"refreshTokenTransport": "cookie"}
    with client.post(path, json=body, headers=sent) as response:
        assert_answer_is_sound(response.status_code, response.mimetype, response.get_data())


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(ROUTES), authorization=HEADER_TEXT, user_agent=HEADER_TEXT)
def test_any_value_in_authorization_and_user_agent(fuzzed_app, route, authorization, user_agent):
    app, tokens = fuzzed_app
    headers = {"Authorization": f"Bearer {authorization}", "User-Agent": user_agent}
    with app.test_client().open(route[1], method=route[0], headers=headers) as response:
        assert_answer_is_sound(response.status_code, response.mimetype, response.get_data())


FORGED_AT = {
    "GET /me": lambda client, token: client.get(
        "/me", headers={"Authorization": f"Bearer {token}"}
    ),
    "GET /sessions": lambda client, token: client.get(
        "/sessions", headers={"Authorization": f"Bearer {token}"}
    ),
    "POST /token": lambda client, token: client.post("/token", json={"refreshToken": token}),
    "POST /logout": lambda client, token: client.post(
        "/logout", json={"refreshToken": token, "scope": "global"}
    ),
    "POST /introspect": lambda client, token: client.post(
        "/introspect", data={"token": token}, auth=("fuzz", "fuzz-client-secret-0123456789")
    ),
}


@pytest.mark.parametrize("where", FORGED_AT)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(token=FORGED)
def test_any_forged_token_is_refused_never_a_500(fuzzed_app, where, token):
    app, _ = fuzzed_app
    with FORGED_AT[where](app.test_client(), token) as response:
        assert_answer_is_sound(response.status_code, response.mimetype, response.get_data())
        assert response.status_code in (204, 400, 401, 403) or response.json == {"active": False}


RAW_HEADER_BYTES = st.binary(max_size=60).map(
    lambda raw: raw.replace(b"\r", b"").replace(b"\n", b"")
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    route=st.sampled_from(ROUTES),
    value=RAW_HEADER_BYTES,
    name=st.sampled_from(
        [b"Authorization", b"Cookie", b"X-CSRF-Token", b"Origin", b"User-Agent", b"Content-Type"]
    ),
    body=st.binary(max_size=100) | st.just(json.dumps(DEMO).encode()),
)
def test_raw_bytes_in_headers_never_make_a_500(live_server_module, route, value, name, body):
    method, path = route
    host, port = live_server_module.removeprefix("http://").split(":")
    request = b"%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" % (
        method.encode(),
        path.encode(),
    )
    if name == b"Authorization":
        value = b"Bearer " + value
    request += b"%s: %s\r\nContent-Length: %d\r\n\r\n" % (name, value, len(body)) + body
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    content_type = next(
        (
            line.split(b":", 1)[1].strip().decode()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-type:")
        ),
        "",
    )
    if status == 400 and not content_type:
        return  # refused by the HTTP server itself, before the app: not ours to shape
    assert_answer_is_sound(status, content_type, payload)


@pytest.fixture(scope="module")
def live_server_module(tmp_path_factory):
    """One `python server.py` for the whole raw-bytes run."""
    import sys

    from .conftest import ROOT, free_port, serve, user_env

    port = free_port()
    folder = tmp_path_factory.mktemp("fuzz")
    env = user_env(
        PORT=str(port),
        LOGIN_RATE_LIMIT="1000 per minute",
        LOGIN_ADDRESS_RATE_LIMIT="1000 per minute",
    )
    with serve([sys.executable, str(ROOT / "server.py")], env, folder, port) as (url, _):
        yield url
