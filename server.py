"""The service: the app factory and the four routes of the Express original, in the order a
client meets them.

``POST /login`` starts a session and answers with an access and a refresh token;
``POST /token`` trades the refresh token for a new pair; ``POST /logout`` ends the session;
``GET /me`` is what an access token is for. Run it with ``python server.py``.

Read this file first, then auth.py (the tokens) and store.py (the sessions). Every other
module is a capability of its own, plugged in by ``create_app`` (the Redis backend by
``store.init_app``); a first reading skips them.
"""

import time
from collections.abc import Mapping

from flask import Blueprint, Flask, Response, g, jsonify, request

import accounts
import auth
import browser
import metrics
import other_services
import sessions
import settings
import slow_clients
import store
import throttle
import token_cache
import users
import web
from auth import InvalidToken, SessionEnded, get_tokens, live_account, token_required
from browser import deliver, logged_out, presented_refresh_claims
from errors import APIError, after_colon
from sessions import end_sessions, logout_scope
from store import Rotation, Session, get_policy, get_store, new_id
from throttle import Throttled, get_login_guard
from users import MAX_EMAIL_LENGTH, MAX_PASSWORD_LENGTH, get_users
from web import audit, client_address, json_body, text_field

MAX_USER_AGENT = 256

api = Blueprint("api", __name__)


def create_app(test_config: Mapping[str, str] | None = None) -> Flask:
    """Build the app. Settings come from the environment and .env, or from test_config alone."""
    app = Flask(__name__)
    settings.init_app(app, test_config)
    web.init_app(app)  # JSON errors, common headers, bounded bodies
    store.init_app(app)  # sessions in this process, or in Redis where REDIS_URL says
    throttle.init_app(app)  # login limits
    auth.init_app(app)  # the keys of both kinds of token
    token_cache.init_app(app)  # verified access tokens, remembered until they expire
    users.init_app(app)  # the accounts, and the `flask users` commands
    slow_clients.init_app(app)  # bodies read before a thread: `granian --interface rsgi`
    metrics.init_app(app)  # GET /metrics: counts of the audit line and of every request

    app.register_blueprint(api)  # the story: below
    app.register_blueprint(sessions.bp)  # GET /sessions, DELETE /sessions/<id>
    app.register_blueprint(accounts.bp)  # POST /password
    app.register_blueprint(browser.bp)  # the demo page, the refresh cookie and CSRF
    app.register_blueprint(other_services.bp)  # the JWKS and introspection
    app.register_blueprint(web.bp)  # /healthz and /openapi.json
    return app


@api.post("/login")
def login() -> Response:
    """Check the email and password, then start a session: an access and a refresh token."""
    body = json_body()
    email = text_field(body, "email", MAX_EMAIL_LENGTH)  # bounded before any work
    password = text_field(body, "password", MAX_PASSWORD_LENGTH)
    browser.choose_transport(body)
    guard, address = get_login_guard(), client_address()
    try:
        guard.count_attempt(email, address)  # before any hashing
    except Throttled as error:
        audit("login_throttled", limit=error.limit)
        raise
    users = get_users()
    user = users.authenticate(email, password)
    if user is None:
        raise wrong_credentials()
    now = int(time.time())
    user_agent = request.headers.get("User-Agent", "")[:MAX_USER_AGENT]
    session = get_policy().new_session(user.id, now, user_agent, address)
    for evicted in get_store().start(session, now):
        # OWASP Session Management Cheat Sheet: a cap on sessions per user; the oldest goes.
        audit("session_evicted", user=user.id, session=evicted[:8])
    if not users.still_holds(user, password):  # changed meanwhile by another process
        get_store().end(session.id, user.id, now)
        raise wrong_credentials()
    guard.succeeded(email, address)
    audit("login_succeeded", user=user.id, session=session.id[:8])
    return token_response(session, now)


@api.post("/token")
def refresh() -> Response:
    """Trade a refresh token for a new pair; the presented one is spent (RFC 9700 §4.14.2)."""
    try:
        claims = presented_refresh_claims(json_body())
    except InvalidToken as error:
        audit("refresh_refused", reason="invalid_token")
        message = f"The refresh token is not valid: {after_colon(str(error))}"
        raise invalid_refresh_token(message) from None
    now, sid = int(time.time()), claims["sid"]
    outcome, session = get_store().rotate(
        sid, claims["jti"], new_jti=new_id(), user=claims["sub"], now=now, ip=client_address()
    )
    if outcome is Rotation.REUSE_ENDED_SESSION:
        # RFC 9700 §4.14.2: a spent token shown again means two parties hold it, and we
        # cannot tell the thief from the user, so the whole session ends.
        audit("session_ended", user=claims["sub"], session=sid[:8], reason="reuse")
        raise invalid_refresh_token(
            "This refresh token was already used, so the session was ended."
        )
    if session is None:
        audit("refresh_refused", user=claims["sub"], session=sid[:8], reason="session_ended")
        raise invalid_refresh_token("This refresh token's session has ended.")
    try:
        live_account(session)
    except SessionEnded:
        get_store().end(sid, session.user_id, now)  # the account was removed
        audit("refresh_refused", user=session.user_id, session=sid[:8], reason="account_removed")
        raise invalid_refresh_token("This refresh token's account no longer exists.") from None
    # A forgiven retry (Policy.accepts) is answered with the same current token, not a new one.
    retried = outcome is Rotation.FORGIVEN_RETRY
    audit("refresh_replayed" if retried else "refreshed", user=session.user_id, session=sid[:8])
    return token_response(session, now)


@api.post("/logout")
def logout() -> Response:
    """End the refresh token's session, the user's other sessions, or all of them."""
    body = json_body()
    scope = logout_scope(body)
    try:
        claims = presented_refresh_claims(body)
    except InvalidToken:
        pass  # Logging out is idempotent: an unknown or spent token has no session to end.
    else:
        scope = end_sessions(claims, scope)  # "local" for a spent token: its session ends
    return logged_out(cookies_stay=scope == "others")


@api.get("/me")
@token_required
def me() -> Response:
    """Return who the access token belongs to: what an access token is for."""
    return jsonify(id=g.user.id, email=g.user.email)


def token_response(session: Session, now: int) -> Response:
    """Answer with a new access token and the session's current refresh token."""
    tokens = get_tokens()
    access_token, expires_in = tokens.issue_access(session, now)
    body = {
        "accessToken": access_token,
        "tokenType": "Bearer",
        "expiresIn": expires_in,
        "refreshToken": tokens.issue_refresh(session),
    }
    return deliver(body, session, now)  # the refresh token in the body, or in a cookie


def wrong_credentials() -> APIError:
    """Note a failed login; return its 401."""
    audit("login_failed")
    # OWASP Authentication Cheat Sheet: one answer for a wrong password and an unknown email.
    return APIError(401, "invalid_credentials", "The email or password is incorrect.")


def invalid_refresh_token(message: str) -> APIError:
    """Return the 403 that every refused refresh token gets, as in the Express original."""
    return APIError(403, "invalid_refresh_token", f"{message} Log in again.")


if __name__ == "__main__":
    web.serve(create_app)
