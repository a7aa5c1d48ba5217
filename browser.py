"""The browser transport: the refresh token in an HttpOnly cookie, CSRF checks, page headers.

A page's script should never hold a refresh token, so a browser asks for it in a cookie with
``"refreshTokenTransport": "cookie"`` in the body of ``/login``, ``/token`` and ``/logout``.
A cookie is sent by the browser on its own, so every cookie request must also prove that
our page sent it (CSRF). Without the switch nothing here applies: curl and Postman send the
refresh token in the body, and the routes read the same either way.
"""

from typing import Any

from flask import Response, current_app, request

from auth import same_text
from errors import APIError

REFRESH_COOKIE, CSRF_COOKIE, CSRF_HEADER = "refresh_token", "csrf_token", "X-CSRF-Token"
COOKIE_PATHS = ("/token", "/logout")  # only the routes that use the refresh token see it
# OWASP HTTP Security Response Headers Cheat Sheet, for the demo page and its files.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


def wants_cookie(body: dict[str, Any]) -> bool:
    """Tell whether the client asks for its refresh token in a cookie (default: the body)."""
    transport = body.get("refreshTokenTransport", "body")
    if transport not in ("body", "cookie"):
        message = "The field 'refreshTokenTransport' must be 'body' or 'cookie'."
        raise APIError(400, "invalid_field", message)
    return transport == "cookie"


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


def check_csrf_session(sid: str) -> None:
    """Refuse a CSRF token that is not this session's own: the signed part of the check."""
    sent = request.headers.get(CSRF_HEADER, "")
    if not current_app.extensions["tokens"].csrf_matches(sid, sent):
        raise csrf_failed()


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


def page_headers(response: Response) -> Response:
    """Give the page and its files the browser's protections."""
    response.headers.update(PAGE_HEADERS)
    return response
