"""Sessions a user can see and end, and refresh that survives retries, on both stores."""

import re
import time

import jwt
import pytest
import time_machine

from server import create_app

from .conftest import DEMO, TEST_CONFIG, AuthActions, audit_records, call, released_together

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
SESSION_FIELDS = {
    "id", "current", "createdAt", "lastUsedAt", "expiresAt", "idleExpiresAt", "userAgent", "ip",
}  # fmt: skip
NOT_FOUND = {"error": "session_not_found", "message": "You have no live session with that id."}
ALICE = {"email": "alice@example.com", "password": "alice's password"}


@pytest.fixture(params=["memory", "redis"])
def make_app(request):
    """Build an app on each store, with the given settings on top of the test secrets."""

    def make(**settings):
        config = TEST_CONFIG | settings
        if request.param == "redis":
            config["REDIS_URL"] = request.getfixturevalue("redis_url")
            request.getfixturevalue("redis_client")  # an emptied database
        app = create_app(config)
        app.extensions["users"].add(ALICE["email"], ALICE["password"])
        return app

    return make


class Actions(AuthActions):
    """The calls of AuthActions, plus the session routes."""

    def sessions(self, access_token):
        return self._client.get("/sessions", headers=bearer(access_token))

    def end(self, access_token, sid):
        return self._client.delete(f"/sessions/{sid}", headers=bearer(access_token))

    def logout_scope(self, refresh_token, scope):
        return self._client.post("/logout", json={"refreshToken": refresh_token, "scope": scope})


@pytest.fixture
def actions(make_app):
    return Actions(make_app().test_client())


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def sid_of(token):
    return jwt.decode(token, options={"verify_signature": False})["sid"]


START = [time.time()]


@pytest.fixture(autouse=True)
def start_of_test():
    """Set the instant every `later` of this test counts from."""
    START[0] = int(time.time()) + 0.5  # mid-second: a travel never straddles a boundary


def later(seconds):
    """Travel to `seconds` after the test's start, the clock standing still there."""
    return time_machine.travel(START[0] + seconds, tick=False)


# --- a session id in every token ------------------------------------------------------------


def test_both_tokens_carry_the_session_id_and_refresh_tokens_no_family(actions):
    tokens = actions.tokens()
    access, refresh = (
        jwt.decode(tokens[kind], options={"verify_signature": False})
        for kind in ("accessToken", "refreshToken")
    )
    assert access["sid"] == refresh["sid"] and "fam" not in refresh
    assert re.fullmatch(r"[A-Za-z0-9_-]{22,}", refresh["sid"])  # 128 bits or more


# --- GET /sessions --------------------------------------------------------------------------


def test_sessions_lists_the_callers_live_sessions_most_recent_first(actions):
    with later(0):
        first = actions.login(headers={"User-Agent": "Firefox " + "x" * 300}).json
    with later(5):
        second = actions.login(headers={"User-Agent": "curl/8.5"}).json
        actions.login(**ALICE)
    with later(10):
        first = actions.refresh(first["refreshToken"]).json  # now the most recently used
        response = actions.sessions(second["accessToken"])
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    sessions = response.json["sessions"]
    assert [s["id"] for s in sessions] == [
        sid_of(first["accessToken"]),
        sid_of(second["accessToken"]),
    ]
    assert [s["current"] for s in sessions] == [False, True]
    for session in sessions:
        assert session.keys() == SESSION_FIELDS
        for field in ("createdAt", "lastUsedAt", "expiresAt", "idleExpiresAt"):
            assert RFC3339.match(session[field]), session[field]
        assert session["ip"] == "127.0.0.1"
    assert sessions[0]["userAgent"] == ("Firefox " + "x" * 300)[:256]
    assert sessions[0]["lastUsedAt"] > sessions[0]["createdAt"]


def test_session_times_are_the_sessions_own(make_app):
    actions = Actions(make_app(SESSION_IDLE_TTL="3600", REFRESH_TOKEN_TTL="86400").test_client())
    with time_machine.travel(1_800_000_000, tick=False):
        tokens = actions.tokens()
        (session,) = actions.sessions(tokens["accessToken"]).json["sessions"]
    assert session["createdAt"] == session["lastUsedAt"] == "2027-01-15T08:00:00Z"
    assert session["idleExpiresAt"] == "2027-01-15T09:00:00Z"
    assert session["expiresAt"] == "2027-01-16T08:00:00Z"


def test_idle_expiry_is_null_when_the_idle_timeout_is_off(make_app):
    actions = Actions(make_app(SESSION_IDLE_TTL="0").test_client())
    tokens = actions.tokens()
    assert actions.sessions(tokens["accessToken"]).json["sessions"][0]["idleExpiresAt"] is None


def test_the_ip_is_that_of_the_last_use(actions):
    tokens = actions.tokens()
    with later(20):
        renewed = actions._client.post(
            "/token",
            json={"refreshToken": tokens["refreshToken"]},
            environ_base={"REMOTE_ADDR": "192.0.2.44"},
        ).json
        assert actions.sessions(renewed["accessToken"]).json["sessions"][0]["ip"] == "192.0.2.44"


# --- ending one session ---------------------------------------------------------------------


def test_ending_a_session_ends_all_its_tokens_at_once(actions):
    mine, other = actions.tokens(), actions.tokens()
    response = actions.end(mine["accessToken"], sid_of(other["accessToken"]))
    assert response.status_code == 204
    assert actions.me(other["accessToken"]).status_code == 401
    assert actions.refresh(other["refreshToken"]).status_code == 403
    assert actions.me(mine["accessToken"]).status_code == 200


def test_ending_the_current_session_ends_the_callers_own_token(actions):
    tokens = actions.tokens()
    assert actions.end(tokens["accessToken"], sid_of(tokens["accessToken"])).status_code == 204
    assert actions.me(tokens["accessToken"]).status_code == 401


def test_unknown_ended_and_other_users_sessions_look_the_same(actions):
    mine, alices = actions.tokens(), actions.login(**ALICE).json
    ended = actions.tokens()
    actions.logout(ended["refreshToken"])
    for sid in ("never-issued", sid_of(ended["accessToken"]), sid_of(alices["accessToken"])):
        response = actions.end(mine["accessToken"], sid)
        assert (response.status_code, response.json) == (404, NOT_FOUND)
    assert actions.me(alices["accessToken"]).status_code == 200  # ended nothing


# --- logout scopes --------------------------------------------------------------------------


def test_logout_others_keeps_this_session_only(actions):
    this, other, alices = actions.tokens(), actions.tokens(), actions.login(**ALICE).json
    assert actions.logout_scope(this["refreshToken"], "others").status_code == 204
    assert actions.me(this["accessToken"]).status_code == 200
    assert actions.me(other["accessToken"]).status_code == 401
    assert actions.me(alices["accessToken"]).status_code == 200
    assert [s["current"] for s in actions.sessions(this["accessToken"]).json["sessions"]] == [True]


def test_logout_global_ends_every_session_of_the_user(actions):
    this, other, alices = actions.tokens(), actions.tokens(), actions.login(**ALICE).json
    assert actions.logout_scope(this["refreshToken"], "global").status_code == 204
    for tokens in (this, other):
        assert actions.me(tokens["accessToken"]).status_code == 401
        assert actions.refresh(tokens["refreshToken"]).status_code == 403
    assert actions.me(alices["accessToken"]).status_code == 200


def test_a_stale_token_of_an_ended_session_ends_nothing_more(actions):
    stale, live = actions.tokens(), actions.tokens()
    actions.logout(stale["refreshToken"])
    for scope in ("others", "global"):
        assert actions.logout_scope(stale["refreshToken"], scope).status_code == 204
    assert actions.me(live["accessToken"]).status_code == 200


@pytest.mark.parametrize("scope", ["others", "global"])
def test_a_spent_token_ends_its_own_session_only(actions, scope):
    other = actions.tokens()
    with later(0):
        spent = actions.tokens()
        current = actions.refresh(spent["refreshToken"]).json
    with later(15):  # past the grace window, where a just-spent token still counts
        other = actions.refresh(other["refreshToken"]).json
        assert actions.logout_scope(spent["refreshToken"], scope).status_code == 204
        assert actions.me(current["accessToken"]).status_code == 401  # its own session ended
        assert actions.me(other["accessToken"]).status_code == 200  # the others did not


@pytest.mark.parametrize("scope", ["everywhere", "", None, 1, ["global"], "GLOBAL"])
def test_an_unknown_scope_is_refused_before_the_token_is_read(actions, scope):
    tokens = actions.tokens()
    for body in ({"refreshToken": tokens["refreshToken"], "scope": scope}, {"scope": scope}):
        response = actions._client.post("/logout", json=body)
        assert (response.status_code, response.json) == (
            400,
            {
                "error": "invalid_field",
                "message": "The field 'scope' must be 'local', 'others' or 'global'.",
            },
        )
    assert actions.me(tokens["accessToken"]).status_code == 200


def test_logout_stays_idempotent_in_every_scope(actions):
    tokens = actions.tokens()
    for scope in ("local", "others", "global", "global"):
        assert actions.logout_scope(tokens["refreshToken"], scope).status_code == 204


# --- an access token lives only while its session does -------------------------------------


def end_by_logout(actions, tokens):
    actions.logout(tokens["refreshToken"])


def end_by_reuse(actions, tokens):
    with later(0):
        actions.refresh(tokens["refreshToken"])
    with later(15):  # past the grace window
        assert actions.refresh(tokens["refreshToken"]).status_code == 403


def end_by_delete(actions, tokens):
    other = actions.tokens()
    actions.end(other["accessToken"], sid_of(tokens["accessToken"]))


def end_by_global_logout(actions, tokens):
    actions.logout_scope(actions.tokens()["refreshToken"], "global")


def end_by_others_logout(actions, tokens):
    actions.logout_scope(actions.tokens()["refreshToken"], "others")


@pytest.mark.parametrize(
    "end",
    [end_by_logout, end_by_reuse, end_by_delete, end_by_global_logout, end_by_others_logout],
)
def test_an_access_token_is_refused_right_after_its_session_ends(actions, end):
    tokens = actions.tokens()
    assert actions.me(tokens["accessToken"]).status_code == 200
    end(actions, tokens)
    response = actions.me(tokens["accessToken"])
    assert response.status_code == 401
    assert response.json["message"] == (
        "The access token is not valid: its session has ended. Log in again."
    )
    assert actions.sessions(tokens["accessToken"]).status_code == 401


def test_a_token_refused_at_logout_stays_refused_through_the_leeway(actions):
    tokens = actions.tokens()
    actions.logout(tokens["refreshToken"])
    exp = jwt.decode(tokens["accessToken"], options={"verify_signature": False})["exp"]
    with time_machine.travel(exp + 4, tick=False):  # expired, but within JWT_LEEWAY (5 s)
        assert actions.me(tokens["accessToken"]).status_code == 401


def test_the_idle_timeout_ends_a_session_that_is_not_refreshed(make_app):
    actions = Actions(make_app(SESSION_IDLE_TTL="600", ACCESS_TOKEN_TTL="3600").test_client())
    with later(0):
        tokens, kept = actions.tokens(), actions.tokens()
    with later(500):
        kept = actions.refresh(kept["refreshToken"]).json  # rotation resets the idle deadline
    with later(601):
        assert actions.me(tokens["accessToken"]).status_code == 401  # not expired, but idle
        assert actions.refresh(tokens["refreshToken"]).status_code == 403
        assert actions.me(kept["accessToken"]).status_code == 200
    with later(1101):
        assert actions.refresh(kept["refreshToken"]).status_code == 403


def test_the_idle_timeout_never_extends_the_absolute_lifetime(make_app):
    actions = Actions(make_app(SESSION_IDLE_TTL="600", REFRESH_TOKEN_TTL="1000").test_client())
    with later(0):
        tokens = actions.tokens()
    for elapsed in (500, 990):
        with later(elapsed):
            tokens = actions.refresh(tokens["refreshToken"]).json
    with later(1000):
        assert actions.refresh(tokens["refreshToken"]).status_code == 403


def test_a_login_beyond_the_cap_evicts_the_least_recently_used(make_app, capsys):
    actions = Actions(make_app(MAX_SESSIONS_PER_USER="2").test_client())
    with later(0):
        oldest = actions.tokens()
    with later(1):
        used = actions.tokens()
    with later(2):
        oldest = actions.refresh(oldest["refreshToken"]).json  # now `used` is the least recent
    with later(3):
        newest = actions.tokens()
        assert actions.me(used["accessToken"]).status_code == 401
        assert actions.me(oldest["accessToken"]).status_code == 200
        assert len(actions.sessions(newest["accessToken"]).json["sessions"]) == 2
    evicted = audit_records(capsys.readouterr().err, "session_evicted")
    assert [e["session"] for e in evicted] == [sid_of(used["accessToken"])[:8]]


def test_no_access_token_outlives_its_session(make_app):
    actions = Actions(make_app(REFRESH_TOKEN_TTL="3600", ACCESS_TOKEN_TTL="900").test_client())
    with later(0):
        tokens = actions.tokens()
    with later(3540):  # 60 s of the session left
        renewed = actions.refresh(tokens["refreshToken"]).json
    claims = jwt.decode(renewed["accessToken"], options={"verify_signature": False})
    session_end = jwt.decode(tokens["refreshToken"], options={"verify_signature": False})["exp"]
    assert claims["exp"] == session_end
    assert renewed["expiresIn"] == claims["exp"] - claims["iat"] == 60


def test_a_restart_of_python_server_py_ends_its_sessions(start_server):
    secrets = {k: v for k, v in TEST_CONFIG.items()}
    first = start_server(**secrets)
    tokens = call(first, "POST", "/login", DEMO)[2]
    assert call(first, "GET", "/me", token=tokens["accessToken"])[0] == 200
    restarted = start_server(**secrets)  # same secrets, a fresh in-memory store
    assert call(restarted, "GET", "/me", token=tokens["accessToken"])[0] == 401


# --- the grace window (RFC 9700 §4.14.2) ----------------------------------------------------


def test_a_retry_within_the_window_gets_the_same_refresh_token(actions):
    tokens = actions.tokens()
    with later(0):
        first = actions.refresh(tokens["refreshToken"]).json
    with later(10):  # the window's far edge, inclusive
        retry = actions.refresh(tokens["refreshToken"])
        assert retry.status_code == 200
        assert retry.json["refreshToken"] == first["refreshToken"]  # byte for byte
        assert retry.json["accessToken"] != first["accessToken"]
        assert actions.me(retry.json["accessToken"]).status_code == 200
        assert actions.refresh(first["refreshToken"]).status_code == 200  # it rotates as usual


def test_a_retry_changes_nothing_the_user_can_see(actions):
    tokens = actions.tokens()
    with later(0):
        first = actions.refresh(tokens["refreshToken"]).json
        before = actions.sessions(first["accessToken"]).json
    with later(5):
        actions._client.post(
            "/token",
            json={"refreshToken": tokens["refreshToken"]},
            environ_base={"REMOTE_ADDR": "192.0.2.99"},
        )
        assert actions.sessions(first["accessToken"]).json == before


def test_a_retry_after_the_window_is_reuse(actions):
    tokens = actions.tokens()
    with later(0):
        first = actions.refresh(tokens["refreshToken"]).json
    with later(11):
        assert actions.refresh(tokens["refreshToken"]).status_code == 403
        assert actions.refresh(first["refreshToken"]).status_code == 403  # the session ended
        assert actions.me(first["accessToken"]).status_code == 401


def test_an_older_token_within_the_window_is_reuse(actions):
    tokens = actions.tokens()
    with later(0):
        second = actions.refresh(tokens["refreshToken"]).json
        third = actions.refresh(second["refreshToken"]).json
        assert actions.refresh(tokens["refreshToken"]).status_code == 403
        assert actions.me(third["accessToken"]).status_code == 401


def test_without_grace_any_second_use_is_reuse(make_app):
    actions = Actions(make_app(REFRESH_REUSE_GRACE="0").test_client())
    tokens = actions.tokens()
    first = actions.refresh(tokens["refreshToken"]).json
    assert actions.refresh(tokens["refreshToken"]).status_code == 403
    assert actions.me(first["accessToken"]).status_code == 401


def refresh_race(base, tokens, count=16):
    body = {"refreshToken": tokens["refreshToken"]}
    return released_together(count, lambda _: call(base, "POST", "/token", body))


@pytest.fixture(params=["python server.py", "granian, 2 workers, Redis"])
def real_server(request, module_server):
    """A real server with the given settings, as each kind of user runs it: the module's
    own for those settings (each test logs in afresh and races on its own tokens)."""

    def start(**settings):
        if request.param == "python server.py":
            return module_server(**settings)
        return request.getfixturevalue("shared_cluster")(**settings)[0]

    return start


def test_sixteen_refreshes_at_once_all_get_the_same_token(real_server):
    base = real_server()
    tokens = call(base, "POST", "/login", DEMO)[2]
    results = refresh_race(base, tokens)
    assert [status for status, _, _ in results] == [200] * 16
    (refresh_token,) = {body["refreshToken"] for _, _, body in results}
    status, _, rotated = call(base, "POST", "/token", {"refreshToken": refresh_token})
    assert status == 200 and rotated["refreshToken"] != refresh_token


def test_sixteen_refreshes_at_once_without_grace_have_one_winner(real_server):
    base = real_server(REFRESH_REUSE_GRACE="0")
    tokens = call(base, "POST", "/login", DEMO)[2]
    results = refresh_race(base, tokens)
    assert sorted(status for status, _, _ in results) == [200] + [403] * 15
    winner = next(body for status, _, body in results if status == 200)
    assert call(base, "POST", "/token", {"refreshToken": winner["refreshToken"]})[0] == 403


def test_a_global_logout_racing_sixteen_refreshes_leaves_nothing_alive(real_server):
    base = real_server()
    sessions = [call(base, "POST", "/login", DEMO)[2] for _ in range(4)]

    def act(n):
        if n == 0:
            return call(
                base,
                "POST",
                "/logout",
                {"refreshToken": sessions[0]["refreshToken"], "scope": "global"},
            )
        return call(base, "POST", "/token", {"refreshToken": sessions[n % 4]["refreshToken"]})

    results = released_together(17, act)
    assert results[0][0] == 204
    for status, _, body in results[1:]:
        if status == 200:  # refreshed just before the logout: dead all the same
            assert call(base, "GET", "/me", token=body["accessToken"])[0] == 401
            assert call(base, "POST", "/token", {"refreshToken": body["refreshToken"]})[0] == 403
    for tokens in sessions:
        assert call(base, "GET", "/me", token=tokens["accessToken"])[0] == 401
