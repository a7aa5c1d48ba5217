"""The browser transport: the refresh token in an HttpOnly cookie, CSRF checks, the page.

A page's script should never hold a refresh token, so a browser asks for it in a cookie with
``"refreshTokenTransport": "cookie"`` in the body of ``/login``, ``/token`` and ``/logout``.
A cookie is sent by the browser on its own, so every cookie request must also prove that
our page sent it (CSRF). Without the switch nothing here applies: curl and Postman send the
refresh token in the body. The core routes call the three functions below the same either
way; which transport the request chose lives on ``g``.
"""

import base64
import hashlib
import hmac
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from auth import REFRESH, get_tokens, same_text
from errors import APIError
from store import Session
from web import text_field

REFRESH_COOKIE, CSRF_COOKIE, CSRF_HEADER = "refresh_token", "csrf_token", "X-CSRF-Token"
COOKIE_PATHS = ("/token", "/logout")  # only the routes that use the refresh token see it
# OWASP HTTP Security Response Headers Cheat Sheet and Clickjacking Defense Cheat Sheet
# (ASVS 5.0 V3.4.6), for every HTML answer and the page's files, at whatever address.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}

bp = Blueprint("browser", __name__)


def choose_transport(body: dict[str, Any]) -> None:
    """Note whether the client asks for its refresh token in a cookie (default: the body)."""
    transport = body.get("refreshTokenTransport", "body")
    if transport not in ("body", "cookie"):
        message = "The field 'refreshTokenTransport' must be 'body' or 'cookie'."
        raise APIError(400, "invalid_field", message)
    g.refresh_in_cookie = transport == "cookie"


def presented_refresh_claims(body: dict[str, Any]) -> dict[str, Any]:
    """Return the claims of the refresh token in the body, or in the cookie (CSRF checked).

    Raises InvalidToken for a token that is not a valid refresh token of ours.
    """
    choose_transport(body)
    if not g.refresh_in_cookie:
        return get_tokens().decode(text_field(body, "refreshToken"), REFRESH)
    claims = get_tokens().decode(cookie_refresh_token(), REFRESH)
    check_csrf_session(claims["sid"])  # the CSRF token must be this session's own
    return claims


def deliver(body: dict[str, Any], session: Session, now: int) -> Response:
    """Answer with ``body``; a cookie client gets its refresh token in the cookie instead."""
    if not g.refresh_in_cookie:
        return jsonify(body)
    refresh_token = body.pop("refreshToken")
    response = jsonify(body)
    max_age = session.expires_at - now  # the cookie lives as long as the session may
    set_session_cookies(response, refresh_token, csrf_token(session.id), max_age)
    return response


def logged_out(cookies_stay: bool) -> Response:
    """Answer a logout: 204, and a cookie client's cookies cleared unless they stay."""
    response = current_app.response_class(status=204)
    if g.get("refresh_in_cookie") and not cookies_stay:
        set_session_cookies(response)  # empty, expiring now: the browser drops them
    return response


def cookie_refresh_token() -> str:
    """Return the refresh token of the cookie, once the request has proved it is our page's."""
    # OWASP CSRF Prevention Cheat Sheet: verify the origin with standard headers...
    origin = request.headers.get("Origin")
    if origin is not None and origin != request.host_url.rstrip("/"):
        raise APIError(403, "csrf_failed", "Cookie requests must come from this service's page.")
    # ...and the double-submit cookie, which only a page of this origin can read.
    sent, cookie = request.headers.get(CSRF_HEADER, ""), request.cookies.get(CSRF_COOKIE, "")
    if not sent or not same_text(sent, cookie):
        raise csrf_failed()
    return request.cookies.get(REFRESH_COOKIE, "")


def csrf_token(sid: str) -> str:
    """Return the CSRF token of a session, bound to it by the refresh token's current key.

    OWASP CSRF Prevention Cheat Sheet, signed double-submit cookie: a forger cannot make
    one, and one stolen from another session does not fit this one.
    """
    return _csrf_digest(get_tokens().refresh_keys.current.public, sid)


def check_csrf_session(sid: str) -> None:
    """Refuse a CSRF token that is not this session's own under any refresh key we hold."""
    sent = request.headers.get(CSRF_HEADER, "")
    keys = get_tokens().refresh_keys.keys
    if not any(same_text(sent, _csrf_digest(key.public, sid)) for key in keys):
        raise csrf_failed()


def _csrf_digest(secret: str, sid: str) -> str:
    digest = hmac.new(secret.encode(), f"csrf:{sid}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def csrf_failed() -> APIError:
    """Return the 403 of a cookie request without the right CSRF token."""
    message = f"Send the value of the {CSRF_COOKIE} cookie in the {CSRF_HEADER} header."
    return APIError(403, "csrf_failed", message)


def set_session_cookies(
    response: Response, refresh_token: str = "", csrf: str = "", max_age: int = 0
) -> None:
    """Set the refresh cookie and its CSRF companion; with no values, clear them."""
    secure = current_app.config["APP_ENV"] == "production"
    # OWASP Session Management Cheat Sheet: HttpOnly (no script reads it), SameSite=Strict (no
    # other site's request carries it), Secure in production, and only the paths that use it.
    for path in COOKIE_PATHS:
        response.set_cookie(
            REFRESH_COOKIE, refresh_token, max_age, path=path, secure=secure, httponly=True,
            samesite="Strict",
        )  # fmt: skip
    # Readable by our page, which echoes it in the X-CSRF-Token header (double submit).
    response.set_cookie(CSRF_COOKIE, csrf, max_age, path="/", secure=secure, samesite="Strict")


@bp.get("/")
def index() -> Response:
    """Serve the demo page of the browser flow."""
    return current_app.send_static_file("index.html")


@bp.get("/favicon.ico")
def favicon() -> Response:
    """Answer the browser's automatic icon request without a 404 (the page links its own)."""
    return current_app.response_class(status=204)


@bp.after_app_request
def page_headers(response: Response) -> Response:
    """Give the page, its files and any other HTML the browser's protections."""
    if response.mimetype == "text/html" or request.endpoint == "static":
        response.headers.update(PAGE_HEADERS)
    return response
