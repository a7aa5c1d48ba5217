"""The demo page in a real headless Chromium, driven by Playwright, against `python server.py`.

The pages' clock is Playwright's to move (context.clock), so a silent refresh or a retry is
reached by fast-forwarding time, not by waiting for it. Two pages of one browser context are
two tabs (one cookie jar, one clock); two contexts are two devices.
"""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from .conftest import DEMO, ROOT, call, free_port, refresh_body, serve, user_env

expect = pytest.importorskip("playwright.sync_api").expect

# Debian's chromium-headless-shell, the build Playwright itself runs for headless Chromium: about
# half the CPU of the full browser's headless mode (this file: 7 CPU-seconds against 13). The
# full browser where only it is installed. (/usr/bin/chromium-headless-shell is a sh wrapper.)
HEADLESS_SHELL = Path("/usr/lib/chromium/chromium-headless-shell")
CHROMIUM = str(HEADLESS_SHELL) if HEADLESS_SHELL.exists() else shutil.which("chromium") or ""
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
# Another device in the sessions panel: a User-Agent the page shortens to "Firefox on Windows".
FIREFOX = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:128.0) Gecko/20100101 Firefox/128.0"
# True in a tab once it waits for the refresh lock another tab holds (Web Locks API).
WAITING_FOR_THE_LOCK = (
    "async () => { const locks = await navigator.locks.query();"
    " return locks.held.length === 1 && locks.pending.length === 1; }"
)


@pytest.fixture(scope="module")
def browser():
    """One Chromium for the file: each test opens contexts of its own (cookies, storage and
    clock apart), so sharing the browser shares nothing a test can see."""
    if os.environ.get("CI") == "true" and not HEADLESS_SHELL.exists():
        pytest.fail(f"CI needs Debian's chromium-headless-shell at {HEADLESS_SHELL}")
    if not CHROMIUM:
        pytest.skip("no chromium installed (apt-get install chromium-headless-shell)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(autouse=True)
def close_contexts(request):
    """Close what a test opened in the shared browser: its tabs would run on (their timers,
    their retries against a server already stopped) for the rest of the file."""
    yield
    if "browser" in request.fixturenames:
        for context in request.getfixturevalue("browser").contexts:
            context.close()


class Server(str):
    """A server's URL, with its log and where in the log this test began."""

    log: Path
    since: int


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """`python server.py` with 30-second access tokens, so a refresh comes due quickly: one
    for the file, for the tests that need no restart and no settings of their own."""
    port = free_port()
    env = user_env(PORT=str(port), ACCESS_TOKEN_TTL="30")
    command = [sys.executable, str(ROOT / "server.py")]
    with serve(command, env, tmp_path_factory.mktemp("browser"), port) as (url, log_path):
        yield url, log_path


@pytest.fixture
def server(shared_server):
    """The shared server, as if fresh: every session of the demo account ended (a global
    logout, as a user can), and its log read from this point on."""
    url, log_path = shared_server
    tokens = call(url, "POST", "/login", DEMO)[2]
    assert call(url, "POST", "/logout", refresh_body(tokens) | {"scope": "global"})[0] == 204
    server = Server(url)
    server.log, server.since = log_path, log_path.stat().st_size
    return server


def new_context(browser, **options):
    """A browser context (a device) whose clock, shared by its tabs, the test moves."""
    context = browser.new_context(**options)
    context.clock.install()
    return context


def open_tab(context, url):
    page = context.new_page()
    page.goto(url + "/")
    return page


def press(page, button):
    page.get_by_role("button", name=button, exact=True).click()


def log_in(page):
    press(page, "Log in")
    expect(page.locator("#status")).to_have_text("Logged in.")
    expect(page.locator("#me")).to_contain_text('"email": "demo@example.com"')


def requests_of(page):
    """The requests the page's log shows, oldest first: "GET /me → 401 invalid_token"."""
    return page.locator("#log li.request span").all_inner_texts()


def claims_of(page):
    return json.loads(page.inner_text("#token-claims"))


def session_cookies(context):
    return [c for c in context.cookies() if c["name"] in ("refresh_token", "csrf_token")]


def audit_events(server, event):
    """Count an event in the audit log of the server since this test began."""
    with open(server.log, "rb") as log:
        log.seek(server.since)
        lines = [line for line in log.read().decode().splitlines() if '"audit"' in line]
    return sum(json.loads(line[line.index("{") :])["audit"] == event for line in lines)


def test_log_in_refresh_silently_and_log_out(browser, server, tmp_path):
    elsewhere = browser.new_context(user_agent=FIREFOX)  # a second device, for the panel
    assert elsewhere.request.post(server + "/login", data=DEMO).ok
    context = new_context(browser, viewport={"width": 1000, "height": 900})
    page = context.new_page()
    login_bodies = []
    page.on(
        "response",
        lambda response: (
            login_bodies.append(response.json()) if response.url.endswith("/login") else None
        ),
    )
    page.goto(server + "/")
    expect(page.locator("#status")).to_have_text("Not logged in.")

    log_in(page)
    assert "refreshToken" not in login_bodies[0]  # the refresh token never reaches a script
    refresh_cookies = [c for c in context.cookies() if c["name"] == "refresh_token"]
    assert {c["path"] for c in refresh_cookies} == {"/token", "/logout"}
    assert all(c["httpOnly"] and c["sameSite"] == "Strict" for c in refresh_cookies)
    first_claims = claims_of(page)
    assert {"jti", "exp", "sid"} <= first_claims.keys()
    assert '"typ": "at+jwt"' in page.inner_text("#token-header")
    expect(page.locator("#countdown")).to_have_text(re.compile(r"^0:[23]\d$"))  # m:ss
    expect(page.locator("#token-times")).to_contain_text("Issued at")
    rows = page.locator("#sessions tr")
    expect(rows).to_have_count(2)
    expect(page.locator("#sessions tr.current")).to_contain_text("This session")
    expect(rows.filter(has_text="Firefox on Windows")).to_have_count(1)

    page.clock.fast_forward("00:25")  # past 4/5 of the 30-second life: the refresh is due
    expect(page.locator("#status")).to_have_text("Logged in. Refreshed silently.")
    assert claims_of(page)["jti"] != first_claims["jti"]  # a new access token...
    assert claims_of(page)["sid"] == first_claims["sid"]  # ...of the same session
    press(page, "Call GET /me")  # with the new access token
    expect(page.locator("#me")).to_contain_text("HTTP 200")
    assert requests_of(page)[-2:] == ["POST /token → 200", "GET /me → 200"]

    update = os.environ.get("UPDATE_SCREENSHOT") == "1"
    page.screenshot(path=str(SCREENSHOT if update else tmp_path / "page.png"), full_page=True)

    press(page, "Log out")
    expect(page.locator("#status")).to_have_text("Logged out.")  # the status line stays
    expect(page.locator("#login")).to_be_visible()
    assert not session_cookies(context)


def test_the_page_carries_its_security_headers(browser, server):
    page = browser.new_page()
    response = page.goto(server + "/")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"


def test_the_page_has_its_own_icon_and_nothing_is_missing(browser, server):
    page = browser.new_page()
    failed = []
    page.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)
    page.goto(server + "/")
    icon = page.request.get(server + page.get_attribute("link[rel=icon]", "href"))
    assert icon.status == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert page.request.get(server + "/favicon.ico").status == 204  # for browsers that ask
    assert failed == []


def test_a_reload_keeps_the_session(browser, server):
    page = open_tab(new_context(browser), server)
    logins = []
    page.on("request", lambda r: logins.append(r.url) if r.url.endswith("/login") else None)
    log_in(page)
    sid = claims_of(page)["sid"]

    page.reload()
    expect(page.locator("#status")).to_have_text("Logged in. Refreshed to restore the session.")
    assert claims_of(page)["sid"] == sid
    expect(page.locator("#sessions tr")).to_have_count(1)
    assert len(logins) == 1
    assert audit_events(server, "login_succeeded") == 1


def test_two_tabs_refreshing_at_once_make_one_refresh(browser, server):
    context = new_context(browser)
    tabs = [open_tab(context, server)]
    log_in(tabs[0])
    tabs.append(open_tab(context, server))  # restores the session, and hands tab 0 its token
    expect(tabs[1].locator("#status")).to_have_text("Logged in. Refreshed to restore the session.")
    expect(tabs[0].locator("#token-claims")).to_have_text(tabs[1].inner_text("#token-claims"))
    refreshes = []
    context.on("request", lambda r: refreshes.append(r) if r.url.endswith("/token") else None)

    def hold_until_the_other_tab_waits(route):
        tabs[0].wait_for_function(WAITING_FOR_THE_LOCK)
        route.continue_()

    context.route("**/token", hold_until_the_other_tab_waits, times=1)
    context.clock.fast_forward("00:25")  # both tabs' silent refreshes come due at once

    done = re.compile("Refreshed silently: .*|Another tab refreshed while this one waited: .*")
    for tab in tabs:
        expect(tab.locator("#log li span").last).to_have_text(done)
    last_lines = sorted(tab.locator("#log li span").last.inner_text() for tab in tabs)
    assert [line.split(":")[0] for line in last_lines] == [
        "Another tab refreshed while this one waited",  # and used the token the other got
        "Refreshed silently",
    ]
    assert len(refreshes) == 1
    assert claims_of(tabs[1]) == claims_of(tabs[0])  # one new access token, shared
    for tab in tabs:
        press(tab, "Call GET /me")
        expect(tab.locator("#me")).to_contain_text("HTTP 200")
    assert audit_events(server, "session_ended") == 0


def test_logging_out_in_one_tab_logs_out_the_other(browser, server):
    context = new_context(browser)
    first = open_tab(context, server)
    log_in(first)
    second = open_tab(context, server)
    expect(second.locator("#status")).to_have_text("Logged in. Refreshed to restore the session.")

    press(first, "Log out")
    expect(first.locator("#status")).to_have_text("Logged out.")
    expect(second.locator("#status")).to_have_text("Logged out in another tab.")
    expect(second.locator("#login")).to_be_visible()

    log_in(second)  # and a login reaches the other tab the same way
    expect(first.locator("#status")).to_have_text("Logged in, in another tab.")
    expect(first.locator("#session")).to_be_visible()


def test_let_it_expire_then_a_call_gets_401_refreshes_and_retries(browser, server):
    page = open_tab(new_context(browser), server)
    log_in(page)
    sid = claims_of(page)["sid"]

    press(page, "Let it expire")
    expect(page.locator("#countdown")).to_have_text("0:00")
    already = len(requests_of(page))
    press(page, "Call GET /me")
    expect(page.locator("#me")).to_contain_text("HTTP 200")
    assert requests_of(page)[already:] == [
        "GET /me → 401 invalid_token",
        "POST /token → 200",
        "GET /me → 200",
    ]
    expect(page.locator("#status")).to_have_text("Logged in. Refreshed after a 401.")
    assert claims_of(page)["sid"] == sid


def test_a_second_401_ends_the_session_view(browser, server):
    context = new_context(browser)
    page = open_tab(context, server)
    log_in(page)
    refused = {"error": "invalid_token", "message": "The access token is not valid."}
    context.route("**/me", lambda route: route.fulfill(status=401, json=refused))

    press(page, "Call GET /me")
    expect(page.locator("#status")).to_have_text(
        "The service refused a fresh access token too. Log in again."
    )
    assert requests_of(page)[-3:] == [
        "GET /me → 401 invalid_token",
        "POST /token → 200",
        "GET /me → 401 invalid_token",
    ]
    expect(page.locator("#login")).to_be_visible()


def test_no_answer_is_try_again_with_growing_waits(browser, server):
    context = new_context(browser)
    page = open_tab(context, server)
    log_in(page)
    context.route("**/token", lambda route: route.abort())  # the network fails

    press(page, "Refresh now")
    expect(page.locator("#status")).to_have_text(
        "The service did not answer. You are still logged in; this page tries again in 2 s."
    )
    page.clock.fast_forward("00:02")
    expect(page.locator("#status")).to_contain_text("this page tries again in 4 s.")
    assert requests_of(page)[-2:] == ["POST /token → no answer"] * 2
    expect(page.locator("#session")).to_be_visible()
    assert len(session_cookies(context)) == 3

    context.unroute("**/token")
    page.clock.fast_forward("00:04")
    expect(page.locator("#status")).to_have_text("Logged in. Refreshed on request.")


def test_redis_down_is_try_again_and_the_session_survives(browser, start_server, persistent_redis):
    url = start_server(ACCESS_TOKEN_TTL="30", REDIS_URL=persistent_redis.url)
    context = new_context(browser)
    page = open_tab(context, url)
    log_in(page)
    sid = claims_of(page)["sid"]

    persistent_redis.stop()
    press(page, "Call GET /me")
    expect(page.locator("#me")).to_contain_text("HTTP 503")
    expect(page.locator("#status")).to_have_text(
        "The service is unavailable (it answered 503)."
        " You are still logged in: try again in a moment."
    )
    page.clock.fast_forward("00:25")  # the silent refresh comes due during the outage
    expect(page.locator("#status")).to_contain_text("this page tries again in 5 s.")
    assert requests_of(page)[-1] == "POST /token → 503 store_unavailable"
    expect(page.locator("#session")).to_be_visible()
    assert len(session_cookies(context)) == 3  # refresh cookie (two paths) and CSRF cookie

    persistent_redis.start()
    page.clock.fast_forward("00:05")  # the Retry-After the service asked for
    expect(page.locator("#status")).to_have_text("Logged in. Refreshed silently.")
    press(page, "Call GET /me")
    expect(page.locator("#me")).to_contain_text("HTTP 200")
    assert claims_of(page)["sid"] == sid


def test_the_sessions_panel_lists_ends_and_logs_out_everywhere_else(browser, server):
    tablet = open_tab(new_context(browser, user_agent="Tablet"), server)
    log_in(tablet)
    phone = open_tab(new_context(browser, user_agent="Phone"), server)
    log_in(phone)
    context = new_context(browser)
    page = open_tab(context, server)
    log_in(page)
    rows = page.locator("#sessions tr")
    expect(rows).to_have_count(3)
    expect(page.locator("#sessions tr.current")).to_have_count(1)
    expect(page.locator("#sessions tr.current")).to_contain_text("This session")

    rows.filter(has_text="Tablet").get_by_role("button", name="End").click()
    expect(rows).to_have_count(2)
    press(tablet, "Call GET /me")  # 401, and the refresh is refused: the session is over
    # The service's own sentence, with no prefix stacked on it.
    expect(tablet.locator("#status")).to_have_text(
        "This refresh token's session has ended. Log in again."
    )
    expect(tablet.locator("#login")).to_be_visible()
    assert requests_of(tablet)[-2:] == [
        "GET /me → 401 invalid_token",
        "POST /token → 403 invalid_refresh_token",
    ]

    press(page, "Log out everywhere else")
    expect(rows).to_have_count(1)
    expect(rows).to_contain_text("This session")
    # No other session, so nothing "else" to log out of.
    expect(page.get_by_role("button", name="Log out everywhere else")).to_be_hidden()
    press(phone, "Call GET /me")
    expect(phone.locator("#login")).to_be_visible()
    press(page, "Call GET /me")
    expect(page.locator("#me")).to_contain_text("HTTP 200")

    rows.get_by_role("button", name="End").click()  # ending this session is logging out
    expect(page.locator("#status")).to_have_text("Logged out.")
    assert not session_cookies(context)


PHONE = {"width": 390, "height": 844}  # an iPhone 12 to 15's screen, in CSS pixels
# Anything wider than its box: the page, or a block that would scroll sideways inside it.
SIDEWAYS = """() => [document.documentElement, ...document.querySelectorAll("main *")]
  .filter((e) => e.offsetParent !== null || e === document.documentElement)
  .filter((e) => e.scrollWidth > e.clientWidth + 1 && getComputedStyle(e).overflowX !== "hidden")
  .map((e) => e.id || e.tagName)"""


def test_the_page_fits_a_390_pixel_phone_without_sideways_scrolling(browser, server):
    elsewhere = browser.new_context(user_agent=FIREFOX)
    assert elsewhere.request.post(server + "/login", data=DEMO).ok
    page = open_tab(new_context(browser, viewport=PHONE, is_mobile=True), server)
    assert page.evaluate(SIDEWAYS) == []
    log_in(page)
    expect(page.locator("#sessions tr")).to_have_count(2)
    assert page.evaluate("innerWidth") == 390
    assert page.evaluate(SIDEWAYS) == []
    # Each stacked session row still names what its times are.
    label = "getComputedStyle(document.querySelector('tr.current td:nth-child(5)'), '::before')"
    assert page.evaluate(f"{label}.content") == '"Ends if unused: "'


def test_the_sessions_table_says_which_deadline_and_offers_others_only_with_others(browser, server):
    page = open_tab(new_context(browser), server)
    log_in(page)
    expect(page.locator("thead th").nth(4)).to_have_text("Ends if unused")
    expect(page.locator("#sessions tr")).to_have_count(1)
    expect(page.get_by_role("button", name="Log out everywhere else")).to_be_hidden()
    other = open_tab(new_context(browser), server)
    log_in(other)
    page.reload()  # the list is read again
    expect(page.locator("#sessions tr")).to_have_count(2)
    expect(page.get_by_role("button", name="Log out everywhere else")).to_be_visible()


def test_what_happened_is_drawn_only_once_something_has(browser, server):
    page = open_tab(new_context(browser), server)
    expect(page.locator("#status")).to_have_text("Not logged in.")
    expect(page.get_by_role("heading", name="What happened")).to_be_hidden()
    log_in(page)
    expect(page.get_by_role("heading", name="What happened")).to_be_visible()
    expect(page.locator("#log li").first).to_contain_text("POST /login")


def test_no_answer_says_so_instead_of_an_empty_body(browser, server):
    context = new_context(browser)
    page = open_tab(context, server)
    log_in(page)
    context.route("**/me", lambda route: route.abort())
    press(page, "Call GET /me")
    expect(page.locator("#me")).to_have_text(
        "The service did not answer: it may be down, or the network is."
    )
    expect(page.locator("#status")).to_have_text(
        "The service did not answer. You are still logged in: try again in a moment."
    )


def test_a_login_refused_shows_the_services_sentence_alone(browser, server):
    page = open_tab(new_context(browser), server)
    page.fill("#password", "not the password")
    press(page, "Log in")
    expect(page.locator("#status")).to_have_text("The email or password is incorrect.")


def test_after_a_restart_with_new_random_secrets_the_page_says_so(browser, start_server):
    """No secrets set: each start makes new ones, so the refresh cookie no longer verifies."""
    before = start_server(ACCESS_TOKEN_TTL="30")
    context = new_context(browser)
    log_in(open_tab(context, before))
    after = start_server(ACCESS_TOKEN_TTL="30")  # cookies go by host, not port: the same jar
    page = open_tab(context, after)
    expect(page.locator("#status")).to_have_text("The server restarted, so log in again.")
    expect(page.locator("#login")).to_be_visible()
