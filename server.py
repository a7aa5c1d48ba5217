"""The service: settings, the app factory, the routes and the error handler.

Run it with ``python server.py`` (Flask's threaded server) or ``flask --app server run``.
"""

import hmac
import json
import logging
import math
import os
import re
import secrets
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import redis
import yaml
from dotenv import load_dotenv
from flask import Flask, Response, current_app, g, jsonify, request
from flask_limiter import Limiter, RequestLimit
from jwt.algorithms import HMACAlgorithm
from jwt.exceptions import InvalidKeyError
from limits import parse_many
from werkzeug.exceptions import BadRequest, HTTPException, UnsupportedMediaType

from auth import (
    ACCESS,
    REFRESH,
    APIError,
    InvalidToken,
    Tokens,
    Users,
    bearer_token,
    new_id,
    token_required,
)
from store import REDIS_OPTIONS, MemoryStore, RedisStore, Rotation

# Servers that run the app in several processes, found by their modules in the worker.
MULTI_WORKER_SERVERS = ("gunicorn", "granian")
OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")
# The browser flow: the refresh token in an HttpOnly cookie, and a CSRF token to echo.
REFRESH_COOKIE, CSRF_COOKIE, CSRF_HEADER = "refresh_token", "csrf_token", "X-CSRF-Token"
# OWASP HTTP Security Response Headers Cheat Sheet, for the demo page and its files.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
MIN_SECRET_LENGTH = 32  # RFC 7518 §3.2: an HS256 key is at least as long as its hash, 256 bits
# The audit trail: bare JSON lines on stderr, apart from Flask's log, so tools can parse them.
AUDIT_LOG = logging.getLogger("audit")


class ConfigError(click.ClickException):
    """A setting that cannot be used; click prints the message without a traceback."""


def load_settings(env: Mapping[str, str], log: logging.Logger) -> dict[str, Any]:
    """Read, convert and check every setting; raise ConfigError naming the variable at fault."""
    app_env = env.get("APP_ENV") or "development"
    if app_env not in ("development", "production"):
        raise ConfigError(f"APP_ENV must be 'development' or 'production', not {app_env!r}.")
    production = app_env == "production"
    settings = {
        "APP_ENV": app_env,
        "ACCESS_TOKEN_SECRET": _secret(env, "ACCESS_TOKEN_SECRET", production, log),
        "REFRESH_TOKEN_SECRET": _secret(env, "REFRESH_TOKEN_SECRET", production, log),
        "ACCESS_TOKEN_TTL": _integer(env, "ACCESS_TOKEN_TTL", 900, minimum=1),
        "REFRESH_TOKEN_TTL": _integer(env, "REFRESH_TOKEN_TTL", 1_209_600, minimum=1),
        "JWT_LEEWAY": _integer(env, "JWT_LEEWAY", 5, minimum=0),
        "JWT_ISSUER": env.get("JWT_ISSUER") or "jwt-refresh-service",
        "JWT_AUDIENCE": env.get("JWT_AUDIENCE") or "jwt-refresh-service",
        "LOGIN_RATE_LIMIT": _rate_limit(env, "LOGIN_RATE_LIMIT", "10 per 15 minutes"),
        "DEMO_USER_EMAIL": env.get("DEMO_USER_EMAIL") or "demo@example.com",
        "DEMO_USER_PASSWORD": env.get("DEMO_USER_PASSWORD")
        or (None if production else "demo-password"),
        "HOST": env.get("HOST") or "127.0.0.1",
        "PORT": _integer(env, "PORT", 3000, minimum=1, maximum=65535),
        "REDIS_URL": _redis_url(env, "REDIS_URL"),
    }
    if settings["ACCESS_TOKEN_SECRET"] == settings["REFRESH_TOKEN_SECRET"]:
        # RFC 8725 §3.12: one key per kind of token, so one kind can never pass for the other.
        message = "ACCESS_TOKEN_SECRET and REFRESH_TOKEN_SECRET must differ."
        if production:
            raise ConfigError(message)
        log.warning("%s Tokens are still told apart by their type, but use two secrets.", message)
    return settings


def _secret(env: Mapping[str, str], name: str, production: bool, log: logging.Logger) -> str:
    value = env.get(name)
    if value and len(value) >= MIN_SECRET_LENGTH:
        try:
            HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(value)
        except InvalidKeyError:
            raise ConfigError(f"{name} looks like a PEM or SSH key; use a random string.") from None
        return value
    if production:
        problem = "is not set" if not value else f"is shorter than {MIN_SECRET_LENGTH} characters"
        raise ConfigError(f"{name} {problem}; production needs a long random secret.")
    if value:
        raise ConfigError(f"{name} is shorter than {MIN_SECRET_LENGTH} characters.")
    log.warning("%s is not set: using a random one, so tokens die with this process.", name)
    return secrets.token_urlsafe(32)


def _integer(
    env: Mapping[str, str], name: str, default: int, minimum: int, maximum: int | None = None
) -> int:
    raw = env.get(name) or str(default)
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {raw!r}.") from None
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise ConfigError(f"{name} must be at least {minimum}{upper}, not {value}.")
    return value


def _redis_url(env: Mapping[str, str], name: str) -> str | None:
    url = env.get(name) or None
    if url:
        try:
            redis.connection.parse_url(url)
        except ValueError as error:
            raise ConfigError(f"{name} is not a Redis URL ({error}).") from None
    return url


def _rate_limit(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name) or default
    try:
        parse_many(raw)
    except ValueError:
        raise ConfigError(f"{name} must read like '10 per 15 minutes', not {raw!r}.") from None
    return raw


def create_app(test_config: Mapping[str, str] | None = None) -> Flask:
    """Build the app. Settings come from the environment and .env, or from test_config alone."""
    app = Flask(__name__)
    app.logger.setLevel(logging.INFO)
    if not AUDIT_LOG.handlers:
        AUDIT_LOG.addHandler(logging.StreamHandler())
        AUDIT_LOG.setLevel(logging.INFO)
        AUDIT_LOG.propagate = False
    if test_config is None:
        load_dotenv(".env")  # the real environment wins over .env
    env = os.environ if test_config is None else test_config
    settings = load_settings(env, app.logger)
    app.config.update(settings)
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024

    if settings["REDIS_URL"]:
        app.extensions["store"] = RedisStore(
            redis.Redis.from_url(settings["REDIS_URL"], **REDIS_OPTIONS)
        )
    else:
        app.extensions["store"] = MemoryStore()
    check_server_fit(app, env)
    app.extensions["tokens"] = Tokens(
        access_secret=settings["ACCESS_TOKEN_SECRET"],
        refresh_secret=settings["REFRESH_TOKEN_SECRET"],
        access_ttl=settings["ACCESS_TOKEN_TTL"],
        issuer=settings["JWT_ISSUER"],
        audience=settings["JWT_AUDIENCE"],
        leeway=settings["JWT_LEEWAY"],
    )
    app.extensions["openapi"] = yaml.safe_load(OPENAPI_PATH.read_text())
    users = app.extensions["users"] = Users()
    if settings["DEMO_USER_PASSWORD"]:
        users.add(settings["DEMO_USER_EMAIL"], settings["DEMO_USER_PASSWORD"])

    limiter = Limiter(
        login_throttle_key,
        app=app,
        strategy="moving-window",  # at most N failures in any window, not per clock minute
        storage_uri=settings["REDIS_URL"] or "memory://",
        storage_options=REDIS_OPTIONS,
    )
    # Only /login is throttled; skip the limiter's per-request work everywhere else.
    limiter.request_filter(lambda: request.endpoint != "login")
    # OWASP Authentication Cheat Sheet: throttle failed logins per account and client address.
    throttle_failed_logins = limiter.limit(
        settings["LOGIN_RATE_LIMIT"],
        deduct_when=lambda response: response.status_code == 401,
        on_breach=login_throttled,
    )

    app.post("/login")(throttle_failed_logins(login))
    app.post("/token")(refresh)
    app.post("/logout")(logout)
    app.get("/me")(me)
    app.get("/healthz")(healthz)
    app.get("/openapi.json")(openapi)
    app.get("/")(index)
    app.after_request(page_security_headers)
    app.register_error_handler(HTTPException, handle_http_error)
    app.register_error_handler(redis.RedisError, store_unavailable)
    return app


def check_server_fit(app: Flask, env: Mapping[str, str]) -> None:
    """Refuse or warn about settings that break under a multi-process server."""
    server = next((name for name in MULTI_WORKER_SERVERS if name in sys.modules), None)
    if server is None:
        return
    for name in ("ACCESS_TOKEN_SECRET", "REFRESH_TOKEN_SECRET"):
        if not env.get(name):
            # Each worker would draw its own random key, and reject the others' tokens.
            raise ConfigError(f"{name} must be set under {server}, whose workers must share it.")
    if not app.config["REDIS_URL"]:
        app.logger.warning(
            "Running under %s with the in-memory store: with more than one worker, each "
            "worker has its own sessions and refreshes fail at random. Set REDIS_URL.",
            server,
        )


def login_throttle_key() -> str:
    """Count failures per email and client address, so one email never locks out another."""
    body = request.get_json(silent=True)
    email = body.get("email") if isinstance(body, dict) else None
    return f"{str(email).lower()}|{request.remote_addr}"


def login_throttled(limit: RequestLimit) -> Response:
    """Answer 429 with the seconds to wait until the window lets this email try again."""
    audit("login_throttled")
    retry_after = max(1, math.ceil(limit.reset_at - time.time()))
    message = f"Too many failed logins for this email from your address; retry in {retry_after} s."
    # RFC 6585 §4: a 429 may say in Retry-After how long to wait.
    return handle_http_error(
        APIError(429, "too_many_requests", message, {"Retry-After": str(retry_after)})
    )


def login() -> Response:
    """Check the email and password, then start a session: an access and a refresh token."""
    email, password = json_fields("email", "password")
    in_cookie = refresh_token_transport() == "cookie"
    user = current_app.extensions["users"].authenticate(email, password)
    if user is None:
        audit("login_failed")
        # OWASP Authentication Cheat Sheet: one answer for a wrong password and an unknown email.
        raise APIError(401, "invalid_credentials", "The email or password is incorrect.")
    now = int(time.time())
    family, jti = new_id(), new_id()
    expires_at = now + current_app.config["REFRESH_TOKEN_TTL"]
    current_app.extensions["store"].start(family, jti, expires_at)
    audit("login_succeeded", user=user.id, family=family[:8])
    return token_response(user.id, family, jti, expires_at, now, in_cookie)


def refresh() -> Response:
    """Trade a refresh token for a new pair; the presented one is spent (RFC 9700 §4.14.2)."""
    token, in_cookie = presented_refresh_token()
    try:
        claims = current_app.extensions["tokens"].decode(token, REFRESH)
    except InvalidToken as error:
        raise invalid_refresh_token(f"The refresh token is not valid: {error}") from None
    if in_cookie:
        check_csrf_session(claims["fam"])
    family, new_jti = claims["fam"], new_id()
    outcome = current_app.extensions["store"].rotate(family, claims["jti"], new_jti)
    if outcome is Rotation.REUSED:
        # RFC 9700 §4.14.2: a spent token shown again means two parties hold it, and we
        # cannot tell the thief from the user, so the whole family is now revoked.
        audit("reuse_detected", user=claims["sub"], family=family[:8], revoked="family")
        raise invalid_refresh_token(
            "This refresh token was already used, so the session was ended."
        )
    if outcome is Rotation.UNKNOWN:
        raise invalid_refresh_token("This refresh token's session has ended.")
    audit("refreshed", user=claims["sub"], family=family[:8])
    # ASVS 10.4.8: the new token keeps the family's expiry, so rotation never extends a session.
    now = int(time.time())
    return token_response(claims["sub"], family, new_jti, claims["exp"], now, in_cookie)


def logout() -> Response:
    """End the session of the refresh token and, if one is sent, revoke the access token."""
    token, in_cookie = presented_refresh_token()
    tokens, store = current_app.extensions["tokens"], current_app.extensions["store"]
    try:
        claims = tokens.decode(token, REFRESH)
    except InvalidToken:
        pass  # Logging out is idempotent: an unknown or spent token has no session to end.
    else:
        if in_cookie:
            check_csrf_session(claims["fam"])
        store.revoke(claims["fam"])
        audit("logout", user=claims["sub"], family=claims["fam"][:8])
    access_token = bearer_token()
    if access_token:
        try:
            access = tokens.decode(access_token, ACCESS)
        except InvalidToken:
            pass  # An invalid access token grants nothing, so there is nothing to revoke.
        else:
            # OWASP JWT Cheat Sheet (token revocation): deny its jti until it would expire anyway.
            store.deny(access["jti"], access["exp"])
    response = current_app.response_class(status=204)
    if in_cookie:
        set_session_cookies(response)  # empty, expiring now: the browser drops them
    return response


@token_required
def me() -> Response:
    """Return who the access token belongs to: what an access token is for."""
    user = current_app.extensions["users"].get(g.claims["sub"])
    if user is None:
        raise APIError(
            401,
            "invalid_token",
            "The access token's account no longer exists.",
            {"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return jsonify(id=user.id, email=user.email)


def index() -> Response:
    """Serve the demo page of the browser flow."""
    return current_app.send_static_file("index.html")


def page_security_headers(response: Response) -> Response:
    """Give the page and its files the browser's protections."""
    if request.endpoint in ("index", "static"):
        response.headers.update(PAGE_HEADERS)
    return response


def healthz() -> Response:
    """Tell a load balancer whether this instance can serve: its store must answer."""
    store = current_app.extensions["store"]
    store.ping()  # a Redis error becomes the 503 of store_unavailable
    return jsonify(status="ok", store=store.kind)


def openapi() -> Response:
    """Serve this service's OpenAPI description, openapi.yaml, as JSON."""
    return jsonify(current_app.extensions["openapi"])


def json_body() -> dict[str, Any]:
    """Return the JSON object in the request body (Flask parses it once per request)."""
    try:
        body = request.get_json()
    except UnsupportedMediaType:
        raise APIError(
            415, "unsupported_media_type", "Send a JSON body with 'Content-Type: application/json'."
        ) from None
    except BadRequest:
        raise APIError(400, "invalid_json", "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise APIError(400, "invalid_body", "The request body must be a JSON object.")
    return body


def json_fields(*names: str) -> list[str]:
    """Return the named string fields of the JSON object in the request body."""
    body = json_body()
    for name in names:
        if not isinstance(body.get(name), str):
            raise APIError(400, "invalid_field", f"The field '{name}' must be a string.")
    return [body[name] for name in names]


def refresh_token_transport() -> str:
    """Return where the client wants its refresh token: in the body (default) or a cookie."""
    transport = json_body().get("refreshTokenTransport", "body")
    if transport not in ("body", "cookie"):
        message = "The field 'refreshTokenTransport' must be 'body' or 'cookie'."
        raise APIError(400, "invalid_field", message)
    return transport


def presented_refresh_token() -> tuple[str, bool]:
    """Return the refresh token, from the body or the cookie as the body says, and which."""
    if refresh_token_transport() == "body":
        (token,) = json_fields("refreshToken")
        return token, False
    check_csrf()  # before anything is done with the cookie
    return request.cookies.get(REFRESH_COOKIE, ""), True


def check_csrf() -> None:
    """Refuse a cookie-authenticated request that our own page did not send."""
    # OWASP CSRF Prevention Cheat Sheet: verify the origin with standard headers...
    origin = request.headers.get("Origin")
    if origin is not None and origin != request.host_url.rstrip("/"):
        raise APIError(403, "csrf_failed", "Cookie requests must come from this service's page.")
    # ...and the double-submit cookie, which only a page of this origin can read.
    sent = request.headers.get(CSRF_HEADER, "")
    if not sent or not hmac.compare_digest(sent, request.cookies.get(CSRF_COOKIE, "")):
        raise csrf_failed()


def check_csrf_session(family: str) -> None:
    """Refuse a CSRF token that is not this session's own: the signed part of the check."""
    expected = current_app.extensions["tokens"].csrf_token(family)
    if not hmac.compare_digest(request.headers.get(CSRF_HEADER, ""), expected):
        raise csrf_failed()


def csrf_failed() -> APIError:
    """Return the 403 of a cookie request without the right CSRF token."""
    message = f"Send the value of the {CSRF_COOKIE} cookie in the {CSRF_HEADER} header."
    return APIError(403, "csrf_failed", message)


def token_response(
    sub: str, family: str, jti: str, expires_at: int, now: int, in_cookie: bool = False
) -> Response:
    """Mint a new access token and refresh token ``jti``, and answer with both."""
    tokens = current_app.extensions["tokens"]
    refresh_token = tokens.issue_refresh(sub, family, jti, expires_at, now)
    body = {"accessToken": tokens.issue_access(sub, now), "tokenType": "Bearer"}
    body["expiresIn"] = tokens.access_ttl
    if not in_cookie:
        body["refreshToken"] = refresh_token
    response = jsonify(body)
    response.headers["Cache-Control"] = "no-store"  # RFC 6749 §5.1: tokens are never cached
    if in_cookie:
        csrf = tokens.csrf_token(family)
        set_session_cookies(response, refresh_token, csrf, max_age=expires_at - now)
    return response


def set_session_cookies(
    response: Response, refresh_token: str = "", csrf: str = "", max_age: int = 0
) -> None:
    """Set the refresh cookie and its CSRF companion; with no values, clear them."""
    secure = current_app.config["APP_ENV"] == "production"
    # OWASP Session Management Cheat Sheet: HttpOnly (no script reads it), SameSite=Strict (no
    # other site's request carries it), Secure in production, and only the paths that use it.
    for path in ("/token", "/logout"):
        response.set_cookie(
            REFRESH_COOKIE, refresh_token, max_age, path=path, secure=secure, httponly=True,
            samesite="Strict",
        )  # fmt: skip
    # Readable by our page, which echoes it in the X-CSRF-Token header (double submit).
    response.set_cookie(CSRF_COOKIE, csrf, max_age, path="/", secure=secure, samesite="Strict")


def invalid_refresh_token(message: str) -> APIError:
    """Return the 403 that every refused refresh token gets, as in the Express original."""
    return APIError(403, "invalid_refresh_token", f"{message} Log in again.")


def audit(event: str, **fields: str) -> None:
    """Log one JSON line per security event: ids and prefixes, never a token or password."""
    record = {"time": round(time.time(), 3), "audit": event, "ip": request.remote_addr}
    AUDIT_LOG.info("%s", json.dumps(record | {"pid": os.getpid(), **fields}))


def store_unavailable(error: redis.RedisError) -> Response:
    """Fail closed: without the store's word no token is issued or accepted."""
    current_app.logger.error("The store failed: %s", type(error).__name__)
    message = "The session store is not answering. Try again in a few seconds."
    # RFC 9110 §10.2.3: Retry-After tells a client when a 503 may be over.
    return handle_http_error(APIError(503, "store_unavailable", message, {"Retry-After": "5"}))


def handle_http_error(error: HTTPException) -> Response:
    """Answer every HTTP error, ours and Flask's, with one JSON shape."""
    if error.response is not None:
        return error.response  # already answered in our shape (login_throttled)
    code = getattr(error, "error", None) or re.sub(r"\W+", "_", (error.name or "error").lower())
    response = jsonify(error=code, message=error.description)
    response.status_code = error.code or 500
    for name, value in error.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def main() -> None:
    """Serve with Flask's own threaded server, debug off, where the settings say."""
    try:
        app = create_app()
    except ConfigError as error:
        sys.exit(f"error: {error.message}")
    app.run(host=app.config["HOST"], port=app.config["PORT"], debug=False, threaded=True)


if __name__ == "__main__":
    main()
