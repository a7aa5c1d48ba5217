r"""A second service that trusts the auth service's access tokens: the tutorial's posts server.

It never sees a password or a refresh token. It learns who is calling from the access token, in
one of three ways, chosen by the environment:

- HS256 (the default): it checks the signature itself with the shared ``ACCESS_TOKEN_SECRET``.
- ``ACCESS_TOKEN_ALGORITHM=EdDSA``: it checks the signature itself with the auth service's public
  keys, fetched from its ``/.well-known/jwks.json`` and cached; it holds no secret at all.
- ``INTROSPECT=1``: it asks the auth service's ``/introspect`` about every token, so a logout
  takes effect at once, at the cost of one call per request (RFC 7662).

Run it beside the auth service from the repository root, in the project's venv
(``. .venv/bin/activate``); each pair starts both in the background (``kill %1 %2`` stops
them). This service reads its environment only, not ``.env``.

    # HS256 (the default): both hold the same secret.
    export ACCESS_TOKEN_SECRET=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
    python server.py & python examples/resource_server.py &

    # Or EdDSA: the auth service signs, this one verifies with its public keys.
    ACCESS_TOKEN_ALGORITHM=EdDSA python server.py &
    ACCESS_TOKEN_ALGORITHM=EdDSA python examples/resource_server.py &

    # Or introspection: this service is a client of the auth service, and asks it every time.
    INTROSPECTION_CLIENTS=posts:posts-secret-0123456789 python server.py &
    INTROSPECT=1 INTROSPECTION_CLIENT_ID=posts \
        INTROSPECTION_CLIENT_SECRET=posts-secret-0123456789 python examples/resource_server.py &

    # Then log in to the auth service (port 3000) and show the token here (port 4000):
    TOKEN=$(curl -s http://127.0.0.1:3000/login -H 'Content-Type: application/json' \
        -d '{"email": "demo@example.com", "password": "demo-password"}' \
        | python -c 'import json, sys; print(json.load(sys.stdin)["accessToken"])')
    curl http://127.0.0.1:4000/posts -H "Authorization: Bearer $TOKEN"

docs/keys.md explains the keys, and when to check offline or ask the auth service.
"""

import base64
import functools
import http.client
import json
import logging
import os
import sys
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any, NoReturn
from urllib.error import HTTPError
from urllib.parse import urlencode, urlparse

import jwt
from flask import Flask, abort, current_app, g, make_response, request
from jwt.exceptions import PyJWKClientConnectionError
from werkzeug.datastructures import ResponseCacheControl
from werkzeug.exceptions import HTTPException
from werkzeug.http import parse_cache_control_header

# The tutorial's posts. Their authors are known here only by the account ids that tokens carry
# in ``sub``: the first is demo@example.com's, the second alice@example.com's.
POSTS = (
    {"author": "dGIQiYT2Kdss7Rrr", "title": "Post 1"},
    {"author": "_42YGfwOEr8NJIku", "title": "Post 2"},
)
# RFC 8725 §3.11: only a token that says it is an access token; RFC 9068 §4 names both spellings.
ACCESS_TYPES = {"at+jwt", "application/at+jwt"}
REQUIRED_CLAIMS = ["exp", "iat", "sub", "iss", "aud", "jti"]
# RFC 8725 §3.10: headers that point at keys elsewhere; we never fetch one, and refuse them.
KEY_POINTER_HEADERS = {"jku", "x5u", "jwk", "x5c"}
# RFC 8725 §3.1: bound the work a stranger's input can cost before any decoding.
MAX_TOKEN_LENGTH = 8192
LEEWAY = 5  # seconds of clock difference tolerated between the two servers (RFC 7519 §4.1.4)
TIMEOUT = 5  # seconds to wait for the auth service
MIN_SECRET_LENGTH = 32  # RFC 7518 §3.2: an HS256 key is at least as long as its hash


class ConfigError(Exception):
    """A setting that cannot be used; the message names it."""


class InvalidToken(Exception):
    """The token is not a live access token of the auth service."""


class AuthServerDown(Exception):
    """The auth service could not be asked, so the token cannot be judged now."""


def create_app(env: Mapping[str, str] | None = None) -> Flask:
    """Build the app from the environment, or from the mapping a test hands in."""
    app = Flask(__name__)
    app.config.update(load_settings(os.environ if env is None else env))
    if app.config["ACCESS_TOKEN_ALGORITHM"] == "EdDSA" and not app.config["INTROSPECT"]:
        jwks_url = app.config["AUTH_SERVER_URL"] + "/.well-known/jwks.json"
        app.extensions["jwks"] = CachingJWKClient(jwks_url, app.logger)
    app.register_error_handler(HTTPException, json_error)

    @app.get("/posts")
    @token_required
    def list_posts() -> dict[str, list[dict[str, str]]]:
        """List the posts of the token's user, as the tutorial's second server does."""
        return {"posts": [post for post in POSTS if post["author"] == g.user_id]}

    return app


def token_required(view: Callable) -> Callable:
    """Let the request through only with a valid access token, and put its user id on ``g``."""

    @functools.wraps(view)
    def wrapped(**kwargs: Any) -> Any:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            # RFC 6750 §3.1: a request without credentials gets the challenge, no error code.
            refuse(
                401,
                "missing_token",
                "Send an access token in the 'Authorization: Bearer <token>' header.",
                {"WWW-Authenticate": 'Bearer realm="posts"'},
            )
        try:
            g.user_id = user_of(token.strip())
        except InvalidToken as error:
            reason = str(error)  # one sentence: no capital after the colon
            refuse(
                401,
                "invalid_token",
                f"The access token is not valid: {reason[:1].lower()}{reason[1:]}",
                {"WWW-Authenticate": 'Bearer realm="posts", error="invalid_token"'},
            )
        except AuthServerDown as error:
            refuse(503, "temporarily_unavailable", str(error), {"Retry-After": "5"})
        return view(**kwargs)

    return wrapped


def user_of(token: str) -> str:
    """Return the user id of a valid access token, checked here or by the auth service."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidToken("It is longer than any token the auth service issues.")
    if current_app.config["INTROSPECT"]:
        return introspect(token)
    return verify(token)


def verify(token: str) -> str:
    """Check the token's signature and claims here, with no call to the auth service per token."""
    config = current_app.config
    try:
        header = jwt.get_unverified_header(token)
        typ = header.get("typ")
        # RFC 7515 §4.1.9: a typ is a media type, and media types compare case-insensitively.
        if not (isinstance(typ, str) and typ.lower() in ACCESS_TYPES):
            raise InvalidToken("It is not an access token.")
        if KEY_POINTER_HEADERS & header.keys():
            raise InvalidToken("Its header points at a key; keys come only from the auth service.")
        if config["ACCESS_TOKEN_ALGORITHM"] == "EdDSA":
            kid = header.get("kid")
            if not isinstance(kid, str):
                raise InvalidToken("Its header names no key.")
            # The kid picks one of the auth service's published keys; a stranger's kid finds none.
            key = current_app.extensions["jwks"].get_signing_key(kid)
        else:
            key = config["ACCESS_TOKEN_SECRET"]
        claims = jwt.decode(
            token,
            key,
            # RFC 8725 §3.1: the algorithm is ours, never the one the token's header names.
            algorithms=[config["ACCESS_TOKEN_ALGORITHM"]],
            # RFC 8725 §3.8-3.9: the token must come from the auth service and be meant for us.
            issuer=config["JWT_ISSUER"],
            audience=config["JWT_AUDIENCE"],
            leeway=LEEWAY,
            options={"require": REQUIRED_CLAIMS},
        )
    except PyJWKClientConnectionError:
        raise AuthServerDown("The auth service's keys cannot be fetched; try again.") from None
    except jwt.PyJWTError as error:  # a bad signature, expired, unknown kid, malformed, ...
        raise InvalidToken(f"{error}.".replace("..", ".")) from None
    return claims["sub"]


def introspect(token: str) -> str:
    """Ask the auth service whether the token is a live access token (RFC 7662 §2)."""
    config = current_app.config
    client = f"{config['INTROSPECTION_CLIENT_ID']}:{config['INTROSPECTION_CLIENT_SECRET']}"
    ask = urllib.request.Request(
        config["AUTH_SERVER_URL"] + "/introspect",
        data=urlencode({"token": token}).encode(),  # form-encoded, so a POST (RFC 7662 §2.1)
        # RFC 7662 §2.1: the resource server authenticates itself, here with HTTP Basic.
        headers={"Authorization": "Basic " + base64.b64encode(client.encode()).decode()},
    )
    try:
        with urllib.request.urlopen(ask, timeout=TIMEOUT) as response:
            answer = json.load(response)
    except (OSError, http.client.HTTPException, ValueError) as error:  # refused, 4xx/5xx, not JSON
        if isinstance(error, HTTPError):
            error.close()  # an error answer still holds its connection open
        current_app.logger.warning("Introspection failed: %s", error)
        raise AuthServerDown(
            "The auth service cannot be asked about the token; try again."
        ) from None
    # RFC 7662 §2.2: only an active access token is let through, whatever else the answer says.
    if not (
        isinstance(answer, dict)
        and answer.get("active") is True
        and answer.get("token_type") == "access_token"
        and isinstance(answer.get("sub"), str)
    ):
        raise InvalidToken("The auth service says it is not a live access token.")
    return answer["sub"]


class CachingJWKClient(jwt.PyJWKClient):
    """PyJWKClient that keeps the keys for as long as the auth service says, or while it is down.

    PyJWKClient caches the key set and looks up a token's key by its kid; a kid it has not seen
    makes it fetch the set again (at most once per cooldown), which is how a new key arrives.
    """

    def __init__(self, uri: str, log: logging.Logger) -> None:
        super().__init__(uri, timeout=TIMEOUT)
        self.log = log
        self.last_good: dict[str, Any] | None = None

    def fetch_data(self) -> Any:
        """Fetch the key set, and take its lifespan from the response's Cache-Control."""
        try:
            with urllib.request.urlopen(self.uri, timeout=self.timeout) as response:
                key_set = json.load(response)
                cache_control = response.headers.get("Cache-Control")
        except (OSError, http.client.HTTPException, ValueError) as error:
            if isinstance(error, HTTPError):
                error.close()  # an error answer still holds its connection open
            if self.last_good is None:
                raise PyJWKClientConnectionError(f"Cannot fetch {self.uri}: {error}") from None
            # RFC 5861 §4 (stale-if-error): the keys we had beat no keys while the server is down.
            self.log.warning(
                "Cannot fetch %s (%s); using the keys fetched before.", self.uri, error
            )
            return self.last_good
        # RFC 9111 §5.2.2.1: max-age says how long the auth service lets us keep its keys.
        max_age = parse_cache_control_header(cache_control, cls=ResponseCacheControl).max_age
        if max_age is not None:
            self.jwk_set_cache.lifespan = max_age
        self.last_good = key_set
        return key_set


def load_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """Read every setting once, at start; raise ConfigError naming a missing or bad one."""
    settings = {
        "AUTH_SERVER_URL": (env.get("AUTH_SERVER_URL") or "http://127.0.0.1:3000").rstrip("/"),
        "ACCESS_TOKEN_ALGORITHM": env.get("ACCESS_TOKEN_ALGORITHM") or "HS256",
        "ACCESS_TOKEN_SECRET": env.get("ACCESS_TOKEN_SECRET") or None,
        "INTROSPECT": env.get("INTROSPECT") or "0",
        "INTROSPECTION_CLIENT_ID": env.get("INTROSPECTION_CLIENT_ID") or None,
        "INTROSPECTION_CLIENT_SECRET": env.get("INTROSPECTION_CLIENT_SECRET") or None,
        "JWT_ISSUER": env.get("JWT_ISSUER") or "jwt-refresh-service",
        "JWT_AUDIENCE": env.get("JWT_AUDIENCE") or "jwt-refresh-service",
        "PORT": env.get("PORT") or "4000",
    }
    if urlparse(settings["AUTH_SERVER_URL"]).scheme not in ("http", "https"):
        raise ConfigError("AUTH_SERVER_URL must start with http:// or https://.")
    if settings["ACCESS_TOKEN_ALGORITHM"] not in ("HS256", "EdDSA"):
        raise ConfigError("ACCESS_TOKEN_ALGORITHM must be 'HS256' or 'EdDSA'.")
    if settings["INTROSPECT"] not in ("0", "1"):
        raise ConfigError("INTROSPECT must be 0 or 1.")
    settings["INTROSPECT"] = settings["INTROSPECT"] == "1"
    if not settings["PORT"].isdigit() or not 0 < int(settings["PORT"]) < 65536:
        raise ConfigError("PORT must be a port number, 1 to 65535.")
    settings["PORT"] = int(settings["PORT"])
    if settings["INTROSPECT"]:
        required = ["INTROSPECTION_CLIENT_ID", "INTROSPECTION_CLIENT_SECRET"]
    else:
        required = ["ACCESS_TOKEN_SECRET"] if settings["ACCESS_TOKEN_ALGORITHM"] == "HS256" else []
    for name in required:
        if not settings[name]:
            raise ConfigError(f"{name} is not set; this way of checking tokens needs it.")
    secret = settings["ACCESS_TOKEN_SECRET"]
    if "ACCESS_TOKEN_SECRET" in required and len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(f"ACCESS_TOKEN_SECRET is shorter than {MIN_SECRET_LENGTH} characters.")
    return settings


def json_error(error: HTTPException) -> tuple[dict[str, str], int]:
    """Answer every HTTP error in the one JSON shape the auth service uses too."""
    return {"error": error.name.lower().replace(" ", "_"), "message": error.description}, error.code


def refuse(
    status: int, error: str, message: str, headers: dict[str, str] | None = None
) -> NoReturn:
    """Stop the request with a JSON error body."""
    abort(make_response({"error": error, "message": message}, status, headers or {}))


if __name__ == "__main__":
    try:
        app = create_app()
    except ConfigError as error:
        sys.exit(f"resource_server: {error}")
    app.run(host="127.0.0.1", port=app.config["PORT"])
