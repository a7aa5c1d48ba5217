"""The service: the app factory and the routes, in the order a client meets them.

``POST /login`` starts a session and answers with an access and a refresh token;
``POST /token`` trades the refresh token for a new pair; ``POST /logout`` ends the session;
``GET /me`` is what an access token is for. Run it with ``python server.py``.
"""

import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import redis
import yaml
from dotenv import load_dotenv
from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from limits.storage import MemoryStorage, RedisStorage
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.serving import WSGIRequestHandler

from auth import (
    ACCESS,
    REFRESH,
    InvalidToken,
    Tokens,
    live_session,
    same_text,
    token_required,
)
from browser import (
    check_csrf_session,
    cookie_refresh_token,
    page_headers,
    set_session_cookies,
    wants_cookie,
)
from errors import APIError, error_code, register_error_handlers
from keys import eddsa_ring, hmac_ring
from settings import ConfigError, load_settings
from store import REDIS_OPTIONS, MemoryStore, Policy, RedisStore, Rotation, Session, new_id
from throttle import LoginGuard, Throttled
from users import MAX_EMAIL_LENGTH, MAX_PASSWORD_LENGTH, Users, users_cli

MAX_BODY = 64 * 1024
MAX_USER_AGENT = 256
LOGOUT_SCOPES = ("local", "others", "global")
OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")
# The audit trail: bare JSON lines on stderr, apart from Flask's log, so tools can parse them.
AUDIT_LOG = logging.getLogger("audit")

api = Blueprint("api", __name__)


@api.post("/login")
def login() -> Response:
    """Check the email and password, then start a session: an access and a refresh token."""
    body = json_body()
    email = text_field(body, "email", MAX_EMAIL_LENGTH)  # bounded before any work
    password = text_field(body, "password", MAX_PASSWORD_LENGTH)
    in_cookie = wants_cookie(body)
    guard = current_app.extensions["login_guard"]
    try:
        guard.count_attempt(email, request.remote_addr)  # before any hashing
    except Throttled as error:
        audit("login_throttled", limit=error.limit)
        raise
    users = current_app.extensions["users"]
    user = guard.check_password(lambda: users.authenticate(email, password))
    if user is None:
        audit("login_failed")
        # OWASP Authentication Cheat Sheet: one answer for a wrong password and an unknown email.
        raise APIError(401, "invalid_credentials", "The email or password is incorrect.")
    guard.succeeded(email, request.remote_addr)
    now = int(time.time())
    user_agent = request.headers.get("User-Agent", "")[:MAX_USER_AGENT]
    session = current_app.extensions["policy"].new_session(
        user.id, now, user_agent, request.remote_addr
    )
    for evicted in current_app.extensions["store"].start(session, now):
        # OWASP Session Management Cheat Sheet: a cap on sessions per user; the oldest goes.
        audit("session_evicted", user=user.id, session=evicted[:8])
    audit("login_succeeded", user=user.id, session=session.id[:8])
    return token_response(session, now, in_cookie)


@api.post("/token")
def refresh() -> Response:
    """Trade a refresh token for a new pair; the presented one is spent (RFC 9700 §4.14.2)."""
    body = json_body()
    in_cookie = wants_cookie(body)
    try:
        claims = presented_refresh_claims(body, in_cookie)
    except InvalidToken as error:
        raise invalid_refresh_token(f"The refresh token is not valid: {error}") from None
    now, sid = int(time.time()), claims["sid"]
    outcome, session = current_app.extensions["store"].rotate(
        sid, claims["jti"], new_jti=new_id(), user=claims["sub"], now=now, ip=request.remote_addr
    )
    if outcome is Rotation.REUSED:
        # RFC 9700 §4.14.2: a spent token shown again means two parties hold it, and we
        # cannot tell the thief from the user, so the whole session ends.
        audit("session_ended", user=claims["sub"], session=sid[:8], reason="reuse")
        raise invalid_refresh_token(
            "This refresh token was already used, so the session was ended."
        )
    if session is None:
        raise invalid_refresh_token("This refresh token's session has ended.")
    if current_app.extensions["users"].get(session.user) is None:
        current_app.extensions["store"].end(sid, session.user, now)  # the account was removed
        raise invalid_refresh_token("This refresh token's account no longer exists.")
    # A grace window relaxes RFC 9700 §4.14.2's rotation as Auth0, Ory Hydra and Supabase
    # do: the token just spent, retried within REFRESH_REUSE_GRACE seconds (two tabs, a
    # lost answer), gets the same current token.
    audit("refresh_replayed" if outcome is Rotation.REPLAYED else "refreshed",
          user=session.user, session=sid[:8])  # fmt: skip
    return token_response(session, now, in_cookie)


@api.post("/logout")
def logout() -> Response:
    """End the refresh token's session, the user's other sessions, or all of them."""
    body = json_body()
    scope = body.get("scope", "local")
    if scope not in LOGOUT_SCOPES:
        message = "The field 'scope' must be 'local', 'others' or 'global'."
        raise APIError(400, "invalid_field", message)
    in_cookie = wants_cookie(body)
    try:
        claims = presented_refresh_claims(body, in_cookie)
    except InvalidToken:
        pass  # Logging out is idempotent: an unknown or spent token has no session to end.
    else:
        end_sessions(claims, scope)
    response = current_app.response_class(status=204)
    if in_cookie and scope != "others":
        set_session_cookies(response)  # empty, expiring now: the browser drops them
    return response


def presented_refresh_claims(body: dict[str, Any], in_cookie: bool) -> dict[str, Any]:
    """Return the claims of the refresh token in the body, or in the cookie (CSRF checked)."""
    token = cookie_refresh_token() if in_cookie else text_field(body, "refreshToken")
    claims = current_app.extensions["tokens"].decode(token, REFRESH)
    if in_cookie:
        check_csrf_session(claims["sid"])  # the CSRF token must be this session's own
    return claims


def end_sessions(claims: dict[str, Any], scope: str) -> None:
    """End the sessions a logout of this scope names, starting from the token's session."""
    store, now = current_app.extensions["store"], int(time.time())
    user, sid = claims["sub"], claims["sid"]
    session, policy = store.get(sid, now), current_app.extensions["policy"]
    if scope != "local" and session is not None and policy.is_current(session, claims, now):
        ended = store.end_all(user, keep=sid if scope == "others" else None)
    else:
        # A token spent before the grace window may be a thief's: it ends its own session,
        # never the others.
        scope = "local"
        ended = [sid] if store.end(sid, user, now) else []
    audit("logout", user=user, session=sid[:8], scope=scope)
    for other in ended:
        audit("session_ended", user=user, session=other[:8], reason=f"logout_{scope}")


@api.get("/me")
@token_required
def me() -> Response:
    """Return who the access token belongs to: what an access token is for."""
    return jsonify(id=g.user.id, email=g.user.email)


@api.get("/sessions")
@token_required
def list_sessions() -> Response:
    """List the caller's live sessions, most recently used first: where am I logged in?"""
    store, now = current_app.extensions["store"], int(time.time())
    sessions = store.sessions(g.claims["sub"], now)
    return jsonify(sessions=[describe(session, g.claims["sid"]) for session in sessions])


@api.delete("/sessions/<sid>")
@token_required
def end_session(sid: str) -> Response:
    """End one of the caller's sessions, and with it all its tokens."""
    store, user = current_app.extensions["store"], g.claims["sub"]
    if not store.end(sid, user, int(time.time())):
        # OWASP Authorization Cheat Sheet: one answer for unknown, ended and other users' ids,
        # so nobody learns which ids exist.
        raise APIError(404, "session_not_found", "You have no live session with that id.")
    audit("session_ended", user=user, session=sid[:8], reason="ended_by_user")
    return current_app.response_class(status=204)


@api.get("/.well-known/jwks.json")
def jwks() -> Response:
    """Publish the public keys that verify access tokens (RFC 7517), for other services."""
    response = jsonify(current_app.extensions["tokens"].access_keys.jwks())
    response.headers["Cache-Control"] = "public, max-age=300"
    return response


@api.post("/introspect")
def introspect() -> Response:
    """Tell a registered client whether a token is active, and whose (RFC 7662)."""
    clients = current_app.config["INTROSPECTION_CLIENTS"]
    if not clients:
        raise APIError(404, "not_found", "Token introspection is not enabled on this service.")
    authenticate_client(clients)
    token = request.form.get("token")
    if not token:
        raise APIError(400, "invalid_request", "Send the token in the form field 'token'.")
    kinds = [ACCESS, REFRESH]
    if request.form.get("token_type_hint") == "refresh_token":
        kinds.reverse()  # RFC 7662 §2.1: the hint only orders the search
    answer = next(filter(None, (active_claims(token, kind) for kind in kinds)), None)
    return jsonify(answer or {"active": False})


def authenticate_client(clients: dict[str, str]) -> None:
    """Let only a client of INTROSPECTION_CLIENTS through, with HTTP Basic (RFC 7662 §2.1)."""
    try:
        credentials = request.authorization
    except ValueError:  # Basic credentials that are not base64 of text
        credentials = None
    sent_id = credentials.username if credentials and credentials.type == "basic" else None
    client_id = sent_id if sent_id in clients else None  # made-up ids get no counter
    guard = current_app.extensions["login_guard"]
    guard.check_client(client_id, request.remote_addr)
    if client_id is not None and same_text(credentials.password or "", clients[client_id]):
        return
    guard.client_failed(client_id, request.remote_addr)
    audit("introspection_client_refused")
    raise APIError(
        401,
        "invalid_client",
        "Authenticate with HTTP Basic as a client listed in INTROSPECTION_CLIENTS.",
        {"WWW-Authenticate": 'Basic realm="introspection"'},
    )


def active_claims(token: str, kind: str) -> dict[str, Any] | None:
    """Return the introspection answer for a live token of this kind, or None."""
    try:
        claims = current_app.extensions["tokens"].decode(token, kind)
        session, _ = live_session(claims)
    except InvalidToken:  # not ours, or its session or account is gone
        return None
    if kind == REFRESH and claims["jti"] != session.jti:
        return None  # spent: only a session's current refresh token is active
    token_type = "access_token" if kind == ACCESS else "refresh_token"
    fields = ("sub", "sid", "exp", "iat", "jti", "iss", "aud")
    return {"active": True, "token_type": token_type} | {name: claims[name] for name in fields}


@api.get("/healthz")
def healthz() -> Response:
    """Tell a load balancer whether this instance can serve: its store must answer."""
    store = current_app.extensions["store"]
    store.ping()  # a Redis error becomes the 503 of store_unavailable
    return jsonify(status="ok", store=store.kind)


@api.get("/openapi.json")
def openapi() -> Response:
    """Serve this service's OpenAPI description, openapi.yaml, as JSON."""
    return jsonify(current_app.extensions["openapi"])


@api.get("/")
def index() -> Response:
    """Serve the demo page of the browser flow."""
    return page_headers(current_app.send_static_file("index.html"))


@api.get("/favicon.ico")
def favicon() -> Response:
    """Answer the browser's automatic icon request without a 404 (the page links its own)."""
    return current_app.response_class(status=204)


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
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    if settings["TRUSTED_PROXIES"]:
        # Behind a TLS proxy, the client's address and scheme come from its X-Forwarded-*
        # headers, which are trusted only from that many proxies (Werkzeug ProxyFix).
        hops = settings["TRUSTED_PROXIES"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)

    policy = app.extensions["policy"] = Policy(
        idle_ttl=settings["SESSION_IDLE_TTL"],
        max_sessions=settings["MAX_SESSIONS_PER_USER"],
        grace=settings["REFRESH_REUSE_GRACE"],
        lifetime=settings["REFRESH_TOKEN_TTL"],
    )
    if settings["REDIS_URL"]:
        client = redis.Redis.from_url(settings["REDIS_URL"], **REDIS_OPTIONS)
        app.extensions["store"] = RedisStore(client, policy)
        counters = RedisStorage(settings["REDIS_URL"], connection_pool=client.connection_pool)
    else:
        app.extensions["store"] = MemoryStore(policy)
        counters = MemoryStorage()
        if settings["SERVER"]:
            app.logger.warning(
                "Running under %s with the in-memory store: with more than one worker, each "
                "worker has its own sessions. Set REDIS_URL.",
                settings["SERVER"],
            )
    app.extensions["login_guard"] = LoginGuard(
        counters,
        {
            "email_address": settings["LOGIN_RATE_LIMIT"],
            "account": settings["LOGIN_ACCOUNT_RATE_LIMIT"],
            "address": settings["LOGIN_ADDRESS_RATE_LIMIT"],
            # Failed authentications of introspection clients, limited like failed logins.
            "client_pair": settings["LOGIN_RATE_LIMIT"],
            "client": settings["LOGIN_ACCOUNT_RATE_LIMIT"],
            "client_address": settings["LOGIN_ADDRESS_RATE_LIMIT"],
        },
        settings["MAX_CONCURRENT_LOGINS"],
    )
    app.extensions["tokens"] = Tokens(
        access_keys=access_keys(settings, app.logger),
        refresh_keys=hmac_ring(
            settings["REFRESH_TOKEN_SECRET"], settings["REFRESH_TOKEN_PREVIOUS_SECRETS"]
        ),
        access_ttl=settings["ACCESS_TOKEN_TTL"],
        issuer=settings["JWT_ISSUER"],
        audience=settings["JWT_AUDIENCE"],
        leeway=settings["JWT_LEEWAY"],
    )
    app.extensions["users"] = load_users(settings, app.logger)
    app.extensions["openapi"] = yaml.safe_load(OPENAPI_PATH.read_text())

    app.register_blueprint(api)
    register_error_handlers(app)
    app.after_request(common_headers)
    app.cli.add_command(users_cli)
    return app


def access_keys(settings: dict[str, Any], log: logging.Logger) -> Any:
    """Build the keys of access tokens: HMAC secrets, or an Ed25519 key pair (EdDSA)."""
    if settings["ACCESS_TOKEN_ALGORITHM"] == "HS256":
        return hmac_ring(settings["ACCESS_TOKEN_SECRET"], settings["ACCESS_TOKEN_PREVIOUS_SECRETS"])
    return eddsa_ring(
        settings["ACCESS_TOKEN_PRIVATE_KEY_FILE"],
        settings["ACCESS_TOKEN_PREVIOUS_PUBLIC_KEY_FILES"],
        log,
        # A key made per process serves one development process; never production's workers.
        allow_generated=settings["APP_ENV"] == "development" and not settings["SERVER"],
    )


def load_users(settings: dict[str, Any], log: logging.Logger) -> Users:
    """Read the accounts of USERS_FILE, and add the demo account where the settings say."""
    # The `flask users` commands must run before the file exists: they create it.
    from_cli = click.get_current_context(silent=True) is not None and not settings["SERVER"]
    path = settings["USERS_FILE"]
    required = settings["APP_ENV"] == "production" and path is not None and not from_cli
    users = Users.load(path, required=required, log=log)
    if settings["DEMO_USER_PASSWORD"]:
        try:
            users.add(settings["DEMO_USER_EMAIL"], settings["DEMO_USER_PASSWORD"])
        except ValueError:
            raise ConfigError("DEMO_USER_EMAIL already has an account in USERS_FILE.") from None
    if settings["APP_ENV"] == "production" and not from_cli and not len(users):
        raise ConfigError(
            "Production has no accounts: set USERS_FILE to a file that "
            "`flask --app server users add EMAIL` fills."
        )
    return users


def common_headers(response: Response) -> Response:
    """Headers every answer carries, whatever route or error produced it."""
    # OWASP HTTP Security Response Headers Cheat Sheet: never let a browser guess the type.
    response.headers["X-Content-Type-Options"] = "nosniff"
    if response.status_code == 204:
        del response.headers["Content-Type"]  # RFC 9110 §15.3.5: no content, so no type
    # RFC 6749 §5.1 and RFC 9111 §5.2.2.5: tokens and personal data are never cached; routes
    # that may be cached (the JWKS, the page's files) say so themselves.
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def json_body() -> dict[str, Any]:
    """Return the JSON object in the request body (each route reads it once)."""
    if not request.is_json:
        raise APIError(
            415, "unsupported_media_type", "Send a JSON body with 'Content-Type: application/json'."
        )
    try:
        # RFC 8259 §8.1: JSON between systems is UTF-8; json.loads alone would take UTF-16 too.
        body = json.loads(read_body().decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested beyond reason
        raise APIError(400, "invalid_json", "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise APIError(400, "invalid_body", "The request body must be a JSON object.")
    return body


def read_body() -> bytes:
    """Read the body, refusing one over MAX_BODY however it is framed (chunked included)."""
    stream, chunks, size = request.stream, [], 0
    while size <= MAX_BODY:
        chunk = stream.read(MAX_BODY + 1 - size)  # Werkzeug raises 413 past its own limit
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > MAX_BODY:
        raise APIError(413, "request_entity_too_large", "The request body is over 64 KiB.")
    return b"".join(chunks)


def text_field(body: dict[str, Any], name: str, max_length: int = MAX_BODY) -> str:
    """Return the body's string field ``name``: present, valid Unicode and not too long."""
    value = body.get(name)
    if not isinstance(value, str):
        raise APIError(400, "invalid_field", f"The field '{name}' must be a string.")
    if len(value) > max_length:
        message = f"The field '{name}' is longer than {max_length} characters."
        raise APIError(400, "invalid_field", message)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON can carry lone surrogates, which are not text
        raise APIError(400, "invalid_field", f"The field '{name}' is not valid text.") from None
    return value


def token_response(session: Session, now: int, in_cookie: bool) -> Response:
    """Answer with a new access token and the session's current refresh token."""
    tokens = current_app.extensions["tokens"]
    access_token, expires_in = tokens.issue_access(session, now)
    refresh_token = tokens.issue_refresh(session)
    body = {"accessToken": access_token, "tokenType": "Bearer", "expiresIn": expires_in}
    if not in_cookie:
        body["refreshToken"] = refresh_token
    response = jsonify(body)
    if in_cookie:
        csrf = tokens.csrf_token(session.id)
        set_session_cookies(response, refresh_token, csrf, max_age=session.expires_at - now)
    return response


def describe(session: Session, current_sid: str) -> dict[str, Any]:
    """Return what GET /sessions shows of a session; times in RFC 3339 UTC."""
    return {
        "id": session.id,
        "current": session.id == current_sid,
        "createdAt": rfc3339(session.created_at),
        "lastUsedAt": rfc3339(session.last_used_at),
        "expiresAt": rfc3339(session.expires_at),
        "idleExpiresAt": rfc3339(session.idle_expires_at) if session.idle_expires_at else None,
        "userAgent": session.user_agent,
        "ip": session.ip,
    }


def rfc3339(timestamp: int) -> str:
    """Return a Unix time as RFC 3339 UTC, e.g. 2026-11-27T10:00:00Z."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def invalid_refresh_token(message: str) -> APIError:
    """Return the 403 that every refused refresh token gets, as in the Express original."""
    return APIError(403, "invalid_refresh_token", f"{message} Log in again.")


def audit(event: str, **fields: str) -> None:
    """Log one JSON line per security event: ids and prefixes, never a token or password."""
    record = {"time": round(time.time(), 3), "audit": event, "ip": request.remote_addr}
    AUDIT_LOG.info("%s", json.dumps(record | {"pid": os.getpid(), **fields}))


class QuietRequestHandler(WSGIRequestHandler):
    """Werkzeug's request handler, telling an attacker less: no versions, no whole ids."""

    def version_string(self) -> str:
        # OWASP HTTP Headers Cheat Sheet: a version only helps an attacker pick an exploit.
        return "jwt-refresh-service"

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        """Answer a request too broken to reach the app in the JSON shape, never echoing it."""
        reason = self.responses.get(code, ("Error",))[0]
        body = json.dumps({"error": error_code(reason), "message": reason})
        self.send_response(code, reason)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body.encode())

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # A session id in a path is logged as a prefix only, as the audit lines do.
        if hasattr(self, "path"):  # not set when the request line itself was broken
            self.path = re.sub(r"(/sessions/[^/?]{8})[^/?]*", r"\1...", self.path)
        super().log_request(code, size)


def main() -> None:
    """Serve with Flask's own threaded server, debug off, where the settings say."""
    try:
        app = create_app()
    except ConfigError as error:
        sys.exit(f"error: {error.message}")
    host, port = app.config["HOST"], app.config["PORT"]
    try:  # say so plainly before anything else, rather than after an address to open
        socket.create_server((host, port)).close()
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        sys.exit(f"error: cannot listen on {host}:{port} ({reason}); set PORT to another.")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    app.logger.info("Open http://%s:%d/ for the demo page.", shown, port)
    app.run(host=host, port=port, debug=False, threaded=True, request_handler=QuietRequestHandler)


if __name__ == "__main__":
    main()
