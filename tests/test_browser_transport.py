"""The browser transport: the refresh token in a cookie, its CSRF checks, and the page's headers."""

import time

import pytest
import time_machine

from browser import check_csrf_session, csrf_token
from errors import APIError
from server import create_app

from .conftest import (
    DEMO,
    PRODUCTION,
    TEST_CONFIG,
)

OLD_REFRESH = "an-old-refresh-secret-0123456789abcdef"


def csrf_of(app, sid):
    with app.app_context():
        return csrf_token(sid)


def fits(app, sid, sent):
    with app.test_request_context(headers={"X-CSRF-Token": sent}):
        try:
            check_csrf_session(sid)
        except APIError as error:
            assert (error.code, error.error) == (403, "csrf_failed")
            return False
        return True


def test_csrf_tokens_match_under_current_and_previous_refresh_secrets():
    old = create_app(TEST_CONFIG | {"REFRESH_TOKEN_SECRET": OLD_REFRESH})
    rotated = create_app(TEST_CONFIG | {"REFRESH_TOKEN_PREVIOUS_SECRETS": OLD_REFRESH})
    assert fits(rotated, "sid-1", csrf_of(old, "sid-1"))
    assert fits(rotated, "sid-1", csrf_of(rotated, "sid-1"))
    assert not fits(rotated, "sid-2", csrf_of(rotated, "sid-1"))
    assert not fits(rotated, "sid-1", "é" * 43)  # any text, never a crash
    assert not fits(old, "sid-1", csrf_of(rotated, "sid-1"))  # a key we do not hold


@pytest.mark.parametrize("sid", ["a", "sid-1", "x" * 200])
def test_a_csrf_token_is_bound_to_its_session(sid):
    app = create_app(TEST_CONFIG)
    assert csrf_of(app, sid) == csrf_of(app, sid)
    assert csrf_of(app, sid) != csrf_of(app, sid + "!")


@pytest.mark.parametrize("path", ["/", "/static/index.html", "/static/app.js", "/static/style.css"])
def test_every_address_of_the_page_and_its_files_refuses_framing(path):
    # ASVS 5.0 V3.4.6, OWASP Clickjacking Defense Cheat Sheet: wherever the page is served.
    response = create_app(TEST_CONFIG).test_client().get(path)
    response.close()  # a static file's answer holds the file open until closed
    assert response.status_code == 200
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Frame-Options"] == "DENY"


def test_any_html_answer_carries_the_page_headers():
    app = create_app(TEST_CONFIG)

    @app.get("/some-html")
    def some_html():
        return "<p>hello</p>"  # Flask answers a str as text/html

    response = app.test_client().get("/some-html")
    assert response.mimetype == "text/html"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


# --- the browser flow: the refresh token in a cookie ------------------------------------------

COOKIE = {"refreshTokenTransport": "cookie"}
COOKIE_LOGIN = DEMO | COOKIE


def set_cookies(response, name):
    """The Set-Cookie headers for one cookie name, parsed into dictionaries."""
    parsed = []
    for header in response.headers.getlist("Set-Cookie"):
        pairs = [part.strip() for part in header.split(";")]
        key, _, value = pairs[0].partition("=")
        if key == name:
            attributes = {p.partition("=")[0].lower(): p.partition("=")[2] for p in pairs[1:]}
            parsed.append({"value": value} | attributes)
    return parsed


def csrf_header(client):
    return {"X-CSRF-Token": client.get_cookie("csrf_token").value}


@pytest.fixture
def cookie_client(client):
    """A client logged in with the cookie transport."""
    assert client.post("/login", json=COOKIE_LOGIN).status_code == 200
    return client


def test_cookie_login_sets_the_refresh_cookie_and_no_body_carries_it(client):
    response = client.post("/login", json=COOKIE_LOGIN)
    assert response.status_code == 200
    assert response.json.keys() == {"accessToken", "tokenType", "expiresIn"}
    refresh_cookies = set_cookies(response, "refresh_token")
    assert sorted(cookie["path"] for cookie in refresh_cookies) == ["/logout", "/token"]
    for cookie in refresh_cookies:
        assert cookie["max-age"] == "1209600"
        assert "httponly" in cookie and cookie["samesite"] == "Strict"
        assert "secure" not in cookie  # development serves plain HTTP
        assert cookie["value"] not in response.get_data(as_text=True)
    (csrf,) = set_cookies(response, "csrf_token")
    assert "httponly" not in csrf and csrf["samesite"] == "Strict" and csrf["path"] == "/"


def test_cookies_are_secure_in_production():
    app = create_app(PRODUCTION | {"DEMO_USER_PASSWORD": "a long chosen password"})
    body = COOKIE_LOGIN | {"password": "a long chosen password"}
    response = app.test_client().post("/login", json=body)
    for name in ("refresh_token", "csrf_token"):
        assert all("secure" in cookie for cookie in set_cookies(response, name))


def test_cookie_refresh_rotates_the_cookie(cookie_client):
    before = cookie_client.get_cookie("refresh_token", path="/token").value
    response = cookie_client.post("/token", json=COOKIE, headers=csrf_header(cookie_client))
    assert response.status_code == 200
    assert "refreshToken" not in response.json
    after = cookie_client.get_cookie("refresh_token", path="/token").value
    assert after != before
    assert after == cookie_client.get_cookie("refresh_token", path="/logout").value
    # The spent cookie, shown again after the grace window, is reuse: the session ends.
    cookie_client.set_cookie("refresh_token", before, path="/token")
    with time_machine.travel(time.time() + 11):
        reused = cookie_client.post("/token", json=COOKIE, headers=csrf_header(cookie_client))
    assert reused.status_code == 403


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-CSRF-Token": ""}, {"X-CSRF-Token": "forged"}],
    ids=["no header", "empty header", "wrong value"],
)
def test_cookie_refresh_without_the_csrf_token_is_refused(cookie_client, headers):
    response = cookie_client.post("/token", json=COOKIE, headers=headers)
    assert (response.status_code, response.json) == (
        403,
        {
            "error": "csrf_failed",
            "message": "Send the value of the csrf_token cookie in the X-CSRF-Token header.",
        },
    )
    # Nothing was rotated: the session still works from its own page.
    page = csrf_header(cookie_client)
    assert cookie_client.post("/token", json=COOKIE, headers=page).status_code == 200


def test_cookie_refresh_from_another_origin_is_refused(cookie_client):
    headers = csrf_header(cookie_client) | {"Origin": "https://evil.example"}
    response = cookie_client.post("/token", json=COOKIE, headers=headers)
    assert (response.status_code, response.json["error"]) == (403, "csrf_failed")
    same_origin = csrf_header(cookie_client) | {"Origin": "http://localhost"}
    assert cookie_client.post("/token", json=COOKIE, headers=same_origin).status_code == 200


def test_a_csrf_token_of_another_session_does_not_fit(client):
    client.post("/login", json=COOKIE_LOGIN)
    other_session = csrf_header(client)
    client.post("/login", json=COOKIE_LOGIN)  # a new session, with its own cookies
    assert client.post("/token", json=COOKIE, headers=other_session).status_code == 403


def test_cookie_logout_ends_the_session_and_clears_the_cookies(cookie_client):
    response = cookie_client.post("/logout", json=COOKIE, headers=csrf_header(cookie_client))
    assert response.status_code == 204
    for name in ("refresh_token", "csrf_token"):
        assert all(cookie["max-age"] == "0" for cookie in set_cookies(response, name))
    assert cookie_client.get_cookie("refresh_token", path="/token") is None
    assert cookie_client.post("/token", json=COOKIE).status_code == 403


def test_a_spent_cookie_logging_out_the_others_ends_its_own_session_and_clears_the_cookies(
    client,
):
    # Reuse (a copied cookie, shown past the grace window) ends the token's own session, not
    # the others: that session is over, so its cookies go too, whatever scope was asked.
    with time_machine.travel(1_900_000_000, tick=False) as clock:
        assert client.post("/login", json=COOKIE_LOGIN).status_code == 200
        spent = client.get_cookie("refresh_token", path="/logout").value
        assert client.post("/token", json=COOKIE, headers=csrf_header(client)).status_code == 200
        clock.shift(15)
        for path in ("/token", "/logout"):
            client.set_cookie("refresh_token", spent, path=path)
        body = COOKIE | {"scope": "others"}
        response = client.post("/logout", json=body, headers=csrf_header(client))
    assert response.status_code == 204
    for name in ("refresh_token", "csrf_token"):
        cleared = set_cookies(response, name)
        assert cleared and all(cookie["max-age"] == "0" for cookie in cleared)


def test_cookie_logout_needs_the_csrf_token(cookie_client):
    assert cookie_client.post("/logout", json=COOKIE).status_code == 403
    page = csrf_header(cookie_client)
    assert cookie_client.post("/token", json=COOKIE, headers=page).status_code == 200


def test_without_the_switch_the_body_is_used_even_with_a_cookie(cookie_client, auth_actions):
    tokens = auth_actions.tokens()  # a body-transport session of the same client
    response = auth_actions.refresh(tokens["refreshToken"])
    assert response.status_code == 200 and "refreshToken" in response.json
    assert cookie_client.post("/token", json={}).status_code == 400  # no silent fallback


@pytest.mark.parametrize("path", ["/token", "/logout"])
def test_unknown_transport_at_token_and_logout(client, path):
    response = client.post(path, json={"refreshToken": "x", "refreshTokenTransport": "header"})
    assert (response.status_code, response.json["error"]) == (400, "invalid_field")


def test_unknown_transport_is_refused(client):
    response = client.post("/login", json=DEMO | {"refreshTokenTransport": "header"})
    assert (response.status_code, response.json) == (
        400,
        {
            "error": "invalid_field",
            "message": "The field 'refreshTokenTransport' must be 'body' or 'cookie'.",
        },
    )


def test_the_demo_page_and_its_headers(client):
    with client.get("/") as response:
        assert response.status_code == 200
        assert response.mimetype == "text/html"
        assert b'<script src="/static/app.js"' in response.data
        csp = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert response.headers["X-Frame-Options"] == "DENY"
    with client.get("/static/app.js") as script:
        assert script.status_code == 200
        assert script.headers["X-Content-Type-Options"] == "nosniff"
        assert ".setItem(" not in script.get_data(as_text=True)  # the token stays in memory


def test_a_cookie_request_is_checked_before_its_token_is_read(client):
    client.set_cookie("refresh_token", "not-a-token", path="/logout")
    assert client.post("/logout", json=COOKIE).status_code == 403  # no CSRF proof: refused
    client.set_cookie("csrf_token", "same", path="/")
    page = {"X-CSRF-Token": "same"}
    assert client.post("/logout", json=COOKIE, headers=page).status_code == 204
