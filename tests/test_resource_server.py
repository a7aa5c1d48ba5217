import base64
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from examples.resource_server import ConfigError, create_app, load_settings
from keys import eddsa_ring

from .conftest import serving

ROOT = Path(__file__).resolve().parent.parent
SECRET = "resource-test-access-secret-0123456789"
ISSUER = "jwt-refresh-service"
HS256 = {"ACCESS_TOKEN_SECRET": SECRET}
DEMO, ALICE = "dGIQiYT2Kdss7Rrr", "_42YGfwOEr8NJIku"  # the account ids of their emails
POST_1 = {"posts": [{"author": DEMO, "title": "Post 1"}]}
JWKS_PATH = "/.well-known/jwks.json"
MISSING = ("missing_token", "Send an access token in the 'Authorization: Bearer <token>' header.")
STRANGER_SECRET = "another-secret-0123456789abcdefghij"
KEY_POINTER = {"jku": "http://127.0.0.1:9/jwks.json"}


def mint(key, algorithm="HS256", typ="at+jwt", ttl=900, headers=None, **claims):
    """An access token as the auth service makes it; a claim given as None is left out."""
    now = int(time.time())
    defaults = {"iss": ISSUER, "aud": ISSUER, "sub": DEMO, "iat": now, "exp": now + ttl, "jti": "j"}
    payload = {name: value for name, value in (defaults | claims).items() if value is not None}
    return jwt.encode(payload, key, algorithm, headers={"typ": typ} | (headers or {}))


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def assert_refused(response, error, message):
    """401 with the RFC 6750 challenge, and the JSON error body."""
    assert response.status_code == 401
    if error == "missing_token":
        assert response.json == {"error": error, "message": message}
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="posts"'
    else:
        assert response.json == {
            "error": error,
            "message": f"The access token is not valid: {message[:1].lower()}{message[1:]}",
        }
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="posts", error="invalid_token"'


def closed_port_url():
    """A URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


# Settings


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "ACCESS_TOKEN_SECRET is not set"),
        ({"ACCESS_TOKEN_SECRET": "short"}, "ACCESS_TOKEN_SECRET is shorter than 32 characters"),
        ({"INTROSPECT": "1"}, "INTROSPECTION_CLIENT_ID is not set"),
        ({"INTROSPECT": "1", "INTROSPECTION_CLIENT_ID": "posts"}, "INTROSPECTION_CLIENT_SECRET"),
        ({"INTROSPECT": "yes"}, "INTROSPECT must be 0 or 1"),
        ({"ACCESS_TOKEN_ALGORITHM": "RS256"}, "ACCESS_TOKEN_ALGORITHM must be 'HS256' or 'EdDSA'"),
        (HS256 | {"PORT": "http"}, "PORT must be a port number"),
        (HS256 | {"AUTH_SERVER_URL": "file:///etc"}, "AUTH_SERVER_URL must start with http"),
    ],
)
def test_bad_settings_stop_the_start_naming_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(env)


def test_settings_defaults():
    settings = load_settings({"ACCESS_TOKEN_ALGORITHM": "EdDSA"})  # EdDSA needs no secret
    assert settings["AUTH_SERVER_URL"] == "http://127.0.0.1:3000"
    assert settings["PORT"] == 4000
    assert settings["INTROSPECT"] is False
    assert settings["JWT_ISSUER"] == settings["JWT_AUDIENCE"] == ISSUER


def test_missing_setting_is_one_line_on_stderr():
    result = subprocess.run(
        [sys.executable, "examples/resource_server.py"],
        cwd=ROOT,
        env={"PATH": ""},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr == (
        "resource_server: ACCESS_TOKEN_SECRET is not set; this way of checking tokens needs it.\n"
    )


# HS256: the shared secret


def test_hs256_token_lists_the_posts_of_its_user():
    client = create_app(HS256).test_client()
    assert client.get("/posts", headers=bearer(mint(SECRET))).json == POST_1
    alice = client.get("/posts", headers=bearer(mint(SECRET, sub=ALICE)))
    assert alice.json == {"posts": [{"author": ALICE, "title": "Post 2"}]}
    stranger = client.get("/posts", headers=bearer(mint(SECRET, sub="someone")))
    assert stranger.json == {"posts": []}


# RFC 9068 §4: both spellings of the media type; RFC 7515 §4.1.9: compared case-insensitively.
@pytest.mark.parametrize("typ", ["at+jwt", "application/at+jwt", "AT+JWT", "Application/At+Jwt"])
def test_hs256_accepts_either_spelling_of_the_access_token_type(typ):
    client = create_app(HS256).test_client()
    assert client.get("/posts", headers=bearer(mint(SECRET, typ=typ))).json == POST_1


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, MISSING),
        ({"Authorization": "Basic abc"}, MISSING),
        ({"Authorization": "Bearer "}, MISSING),
        (bearer("not-a-token"), ("invalid_token", "Not enough segments.")),
        (
            bearer("x" * 8193),
            ("invalid_token", "It is longer than any token the auth service issues."),
        ),
        (bearer(mint(STRANGER_SECRET)), ("invalid_token", "Signature verification failed.")),
        (bearer(mint(SECRET, ttl=-60)), ("invalid_token", "Signature has expired.")),
        (bearer(mint(SECRET, typ="rt+jwt")), ("invalid_token", "It is not an access token.")),
        (bearer(mint(SECRET, typ=None)), ("invalid_token", "It is not an access token.")),
        (
            bearer(mint(SECRET, typ="application/rt+jwt")),
            ("invalid_token", "It is not an access token."),
        ),
        (bearer(mint(SECRET, typ="JWT")), ("invalid_token", "It is not an access token.")),
        (bearer(mint(SECRET, typ=1)), ("invalid_token", "It is not an access token.")),
        (bearer(mint(None, "none")), ("invalid_token", "The specified alg value is not allowed.")),
        (bearer(mint(SECRET, aud="other")), ("invalid_token", "Audience doesn't match.")),
        (bearer(mint(SECRET, iss="other")), ("invalid_token", "Invalid issuer.")),
        (bearer(mint(SECRET, jti=None)), ("invalid_token", 'Token is missing the "jti" claim.')),
        (
            bearer(mint(SECRET, headers=KEY_POINTER)),
            ("invalid_token", "Its header points at a key; keys come only from the auth service."),
        ),
    ],
)
def test_hs256_refuses(headers, expected):
    response = create_app(HS256).test_client().get("/posts", headers=headers)
    assert_refused(response, *expected)


# EdDSA: the public keys from the auth service's JWKS


@pytest.fixture
def ring():
    """The auth service's keys, as keys.py makes them."""
    return eddsa_ring(None, [], logging.getLogger("test"), allow_generated=True)


def mint_eddsa(ring, **kwargs):
    return mint(ring.current.private, "EdDSA", headers={"kid": ring.current.kid}, **kwargs)


def jwks_server(ring, max_age):
    return serving(lambda: (200, {"Cache-Control": f"max-age={max_age}"}, ring.jwks()))


def eddsa_app(url):
    return create_app({"ACCESS_TOKEN_ALGORITHM": "EdDSA", "AUTH_SERVER_URL": url})


def test_eddsa_keys_are_fetched_once_and_outlive_the_auth_service(ring):
    token = mint_eddsa(ring)
    with jwks_server(ring, max_age=120) as (url, seen):
        app = eddsa_app(url)
        client = app.test_client()
        assert client.get("/posts", headers=bearer(token)).json == POST_1
        assert client.get("/posts", headers=bearer(token)).json == POST_1
        assert [(request["method"], request["path"]) for request in seen] == [("GET", JWKS_PATH)]
        assert app.extensions["jwks"].jwk_set_cache.lifespan == 120  # the max-age it was sent
    assert client.get("/posts", headers=bearer(token)).json == POST_1  # the auth service is down


def test_eddsa_keys_past_max_age_are_fetched_again_and_kept_while_it_is_down(ring, caplog):
    token = mint_eddsa(ring)
    with jwks_server(ring, max_age=0) as (url, seen):
        client = eddsa_app(url).test_client()
        assert client.get("/posts", headers=bearer(token)).json == POST_1
        assert client.get("/posts", headers=bearer(token)).json == POST_1
        assert len(seen) == 2  # max-age=0: every check asks again
    with caplog.at_level(logging.WARNING):
        assert client.get("/posts", headers=bearer(token)).json == POST_1
    assert "using the keys fetched before" in caplog.text
    assert token not in caplog.text


def test_eddsa_without_reachable_keys_is_unavailable(ring):
    response = (
        eddsa_app(closed_port_url()).test_client().get("/posts", headers=bearer(mint_eddsa(ring)))
    )
    assert response.status_code == 503
    assert response.json == {
        "error": "temporarily_unavailable",
        "message": "The auth service's keys cannot be fetched; try again.",
    }


def stranger_token(ring):
    """Signed by a key that is not the auth service's, under the auth service's kid."""
    stranger = Ed25519PrivateKey.generate()
    return mint(stranger, "EdDSA", headers={"kid": ring.current.kid})


def confused_token(ring):
    """HS256 keyed with the published public key: the classic algorithm confusion."""
    public = ring.current.public_jwk["x"].encode()
    return mint(public, headers={"kid": ring.current.kid})


@pytest.mark.parametrize(
    ("make_token", "message"),
    [
        (stranger_token, "Signature verification failed."),
        (confused_token, "The specified alg value is not allowed."),
        (lambda ring: mint_eddsa(ring, ttl=-60), "Signature has expired."),
        (lambda ring: mint_eddsa(ring, typ="rt+jwt"), "It is not an access token."),
        (lambda ring: mint(ring.current.private, "EdDSA"), "Its header names no key."),
        (
            lambda ring: mint(ring.current.private, "EdDSA", headers={"kid": "unknown"}),
            'Unable to find a signing key that matches: "unknown".',
        ),
    ],
)
def test_eddsa_refuses(ring, make_token, message):
    with jwks_server(ring, max_age=300) as (url, _):
        response = eddsa_app(url).test_client().get("/posts", headers=bearer(make_token(ring)))
    assert_refused(response, "invalid_token", message)


def test_eddsa_never_fetches_keys_a_token_points_at(ring):
    with jwks_server(ring, max_age=300) as (url, _), jwks_server(ring, 300) as (jku, seen):
        headers = {"kid": ring.current.kid, "jku": jku + JWKS_PATH}
        token = mint(ring.current.private, "EdDSA", headers=headers)
        response = eddsa_app(url).test_client().get("/posts", headers=bearer(token))
    assert_refused(
        response,
        "invalid_token",
        "Its header points at a key; keys come only from the auth service.",
    )
    assert seen == []


# Introspection: ask the auth service each time (RFC 7662)


INTROSPECTION = {"INTROSPECT": "1", "INTROSPECTION_CLIENT_ID": "posts"}
INTROSPECTION |= {"INTROSPECTION_CLIENT_SECRET": "posts-secret-0123456789"}


def introspection_app(url):
    return create_app(INTROSPECTION | {"AUTH_SERVER_URL": url})


def test_introspection_lets_an_active_access_token_through():
    active = {"active": True, "token_type": "access_token", "sub": DEMO, "jti": "j"}
    with serving(lambda: (200, {}, active)) as (url, seen):
        response = introspection_app(url).test_client().get("/posts", headers=bearer("tok.en"))
    assert response.json == POST_1
    [asked] = seen
    assert (asked["method"], asked["path"]) == ("POST", "/introspect")
    assert asked["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert parse_qs(asked["body"]) == {"token": ["tok.en"]}
    credentials = base64.b64encode(b"posts:posts-secret-0123456789").decode()
    assert asked["headers"]["Authorization"] == f"Basic {credentials}"


@pytest.mark.parametrize(
    "answer",
    [
        {"active": False},
        {"active": True, "token_type": "refresh_token", "sub": "1"},
        {"active": "true", "token_type": "access_token", "sub": "1"},
        {"active": True, "sub": "1"},
        ["active"],
    ],
)
def test_introspection_refuses_anything_but_an_active_access_token(answer):
    with serving(lambda: (200, {}, answer)) as (url, _):
        response = introspection_app(url).test_client().get("/posts", headers=bearer("tok.en"))
    assert_refused(
        response, "invalid_token", "The auth service says it is not a live access token."
    )


UNAVAILABLE = {
    "error": "temporarily_unavailable",
    "message": "The auth service cannot be asked about the token; try again.",
}


def test_introspection_with_the_auth_service_down_is_unavailable():
    app = introspection_app(closed_port_url())
    response = app.test_client().get("/posts", headers=bearer("tok.en"))
    assert response.status_code == 503
    assert response.json == UNAVAILABLE


def test_introspection_refused_by_the_auth_service_is_unavailable(caplog):
    with serving(lambda: (401, {"WWW-Authenticate": "Basic"}, {"error": "invalid_client"})) as (
        url,
        _,
    ):
        response = introspection_app(url).test_client().get("/posts", headers=bearer("tok.en"))
    assert response.status_code == 503
    assert response.json == UNAVAILABLE
    assert "401" in caplog.text and "tok.en" not in caplog.text
