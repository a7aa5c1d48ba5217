"""The demo page in a real headless Chromium, driven by Playwright, against `python server.py`.

The page's clock is Playwright's to move (page.clock), so the silent refresh before expiry is
reached by fast-forwarding time, not by waiting for it.
"""

import os
import shutil
from pathlib import Path

import pytest

from .conftest import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# The README's picture; refreshed when UPDATE_SCREENSHOT=1, else kept out of the work tree.
SCREENSHOT = ROOT / "docs" / "browser-flow.png"
# As this machine's notes say: no sandbox as root, and nothing that reaches for the network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail("CI needs Debian's chromium at /usr/bin/chromium")
        pytest.skip("no chromium installed (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def short_lived_server(start_server):
    """`python server.py` with 30-second access tokens, so a refresh comes due quickly."""
    return start_server(ACCESS_TOKEN_TTL="30")


def test_log_in_refresh_silently_and_log_out(browser, short_lived_server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    page = context.new_page()
    page.clock.install()
    login_bodies = []
    page.on(
        "response",
        lambda response: (
            login_bodies.append(response.json()) if response.url.endswith("/login") else None
        ),
    )
    page.goto(short_lived_server + "/")

    page.click("text=Log in")
    page.wait_for_selector("text=GET /me answered 200.")
    assert '"email": "demo@example.com"' in page.inner_text("#me")
    assert "refreshToken" not in login_bodies[0]  # the refresh token never reaches a script
    refresh_cookies = [c for c in context.cookies() if c["name"] == "refresh_token"]
    assert {c["path"] for c in refresh_cookies} == {"/token", "/logout"}
    assert all(c["httpOnly"] and c["sameSite"] == "Strict" for c in refresh_cookies)
    first_claims = page.inner_text("#token-claims")
    assert '"jti"' in first_claims and '"exp"' in first_claims
    assert '"typ": "at+jwt"' in page.inner_text("#token-header")

    page.clock.fast_forward("00:25")  # past 4/5 of the 30-second life: the refresh is due
    page.wait_for_selector("text=Refreshed silently.")
    assert page.inner_text("#token-claims") != first_claims  # a new access token
    page.click("text=Call GET /me")  # with the new access token
    answers = page.locator("#log li", has_text="GET /me answered 200.")
    playwright.expect(answers).to_have_count(2)
    assert page.inner_text("#me").startswith("HTTP 200")

    update = os.environ.get("UPDATE_SCREENSHOT") == "1"
    page.screenshot(path=str(SCREENSHOT if update else tmp_path / "page.png"), full_page=True)

    page.click("text=Log out")
    page.wait_for_selector("text=Logged out (HTTP 204)")
    assert not [c for c in context.cookies() if c["name"] in ("refresh_token", "csrf_token")]
    context.close()


def test_the_page_carries_its_security_headers(browser, short_lived_server):
    page = browser.new_page()
    response = page.goto(short_lived_server + "/")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    page.close()
