"""POST /password: a user changes their own password; the other sessions end, theirs goes on."""

import logging

import pytest
import redis
import time_machine

import users
from server import create_app

from .conftest import LIVE, TEST_CONFIG, audit_records, call, eventually, released_together

PASSWORD = "correct horse battery"
NEW = "a brand new passphrase"
ALICE = {"email": "alice@example.com", "password": PASSWORD}


@pytest.fixture
def users_file(tmp_path):
    path = tmp_path / "users.txt"
    path.write_text(f"alice@example.com:{users.hash_password(PASSWORD)}\n")
    return path


@pytest.fixture
def client(users_file):
    return create_app(TEST_CONFIG | {"USERS_FILE": str(users_file)}).test_client()


def login(client, account=ALICE):
    response = client.post("/login", json=account)
    assert response.status_code == 200, response.json
    return response.json


def change(client, tokens, current=PASSWORD, new=NEW):
    return client.post(
        "/password",
        json={"currentPassword": current, "newPassword": new},
        headers={"Authorization": f"Bearer {tokens['accessToken']}"},
    )


def me(client, tokens):
    return client.get("/me", headers={"Authorization": f"Bearer {tokens['accessToken']}"})


def test_change_ends_the_other_sessions_and_this_one_goes_on(client, users_file, capsys):
    phone, laptop, mine = login(client), login(client), login(client)
    response = change(client, mine)
    assert response.status_code == 204 and response.data == b""
    assert me(client, mine).status_code == 200
    assert client.post("/token", json={"refreshToken": mine["refreshToken"]}).status_code == 200
    for other in (phone, laptop):
        assert me(client, other).status_code == 401
        assert (
            client.post("/token", json={"refreshToken": other["refreshToken"]}).status_code == 403
        )
    assert client.post("/login", json=ALICE).status_code == 401
    assert client.post("/login", json=ALICE | {"password": NEW}).status_code == 200
    # The file holds the new hash, and another process reading it lets the new password in.
    fresh = users.Users.load(str(users_file), required=True, log=logging.getLogger("t"))
    assert fresh.authenticate("alice@example.com", NEW) is not None
    stderr = capsys.readouterr().err
    [changed] = audit_records(stderr, "password_changed")
    assert changed["ended"] == "2"
    assert PASSWORD not in stderr and NEW not in stderr


def test_a_wrong_current_password_is_401_and_counts_as_a_failed_login(users_file):
    client = create_app(
        TEST_CONFIG | {"USERS_FILE": str(users_file), "LOGIN_RATE_LIMIT": "3 per minute"}
    ).test_client()
    tokens = login(client)  # one attempt, cleared by its success
    wrong = change(client, tokens, current="not the password at all")
    assert wrong.status_code == 401
    assert wrong.json == {
        "error": "invalid_credentials",
        "message": "The current password is incorrect.",
    }
    assert change(client, tokens, current="not the password either").status_code == 401
    assert client.post("/login", json=ALICE | {"password": "wrong again!"}).status_code == 401
    throttled = change(client, tokens)  # the fourth attempt: the login limit is full
    assert throttled.status_code == 429
    assert throttled.json["message"] == "Too many failed logins; retry in 1 minute."
    assert client.post("/login", json=ALICE).status_code == 429
    assert me(client, tokens).status_code == 200  # nothing ended


@pytest.mark.parametrize(
    ("new", "problem"),
    [
        ("too short", "it has 9 characters and needs at least 15"),
        ("alice@example.com", "it is the account's email"),
        ("passwordpassword", "one of the most common passwords"),
    ],
)
def test_a_new_password_that_breaks_the_rules_is_400_saying_why(client, new, problem):
    tokens = login(client)
    response = change(client, tokens, new=new)
    assert response.status_code == 400
    assert response.json["error"] == "weak_password"
    assert response.json["message"].startswith("The new password cannot be used: ")
    assert problem in response.json["message"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"newPassword": NEW}, "The field 'currentPassword' must be a string."),
        ({"currentPassword": PASSWORD}, "The field 'newPassword' must be a string."),
        (
            {"currentPassword": PASSWORD, "newPassword": 15},
            "The field 'newPassword' must be a string.",
        ),
        (
            {"currentPassword": PASSWORD, "newPassword": "x" * 1025},
            "The field 'newPassword' is longer than 1024 characters.",
        ),
    ],
)
def test_bad_bodies_are_400(client, body, message):
    tokens = login(client)
    headers = {"Authorization": f"Bearer {tokens['accessToken']}"}
    response = client.post("/password", json=body, headers=headers)
    assert response.status_code == 400 and response.json["message"] == message


def test_without_a_token_is_401(client):
    response = client.post("/password", json={"currentPassword": PASSWORD, "newPassword": NEW})
    assert response.status_code == 401 and response.json["error"] == "missing_token"


def test_the_demo_account_is_403_not_a_500():
    client = create_app(TEST_CONFIG).test_client()  # no USERS_FILE: the demo account only
    tokens = login(client, {"email": "demo@example.com", "password": "demo-password"})
    response = change(client, tokens, current="demo-password")
    assert response.status_code == 403
    assert response.json["error"] == "password_not_changeable"
    assert "DEMO_USER_PASSWORD" in response.json["message"]


def test_a_read_only_file_is_503_and_nothing_changes(client, users_file):
    phone, mine = login(client), login(client)
    users_file.chmod(0o400)
    before = users_file.read_text()
    response = change(client, mine)
    assert response.status_code == 503
    assert response.json == {
        "error": "accounts_unavailable",
        "message": "The accounts file cannot be written right now; the password is unchanged.",
    }
    assert users_file.read_text() == before
    assert me(client, phone).status_code == 200  # no session ended for a change not made
    assert client.post("/login", json=ALICE).status_code == 200


@pytest.mark.parametrize("count", [4, 10])
def test_changes_released_together_leave_one_password_and_its_session(client, users_file, count):
    sessions = [login(client) for _ in range(count)]
    news = [f"{NEW} number {n}" for n in range(count)]
    answers = released_together(count, lambda n: change(client, sessions[n], new=news[n]))
    statuses = [answer.status_code for answer in answers]
    # One wins; each other finds the password changed meanwhile (409) or already wrong (401).
    assert statuses.count(204) == 1 and set(statuses) <= {204, 401, 409}, statuses
    assert all(
        a.json["error"] == "password_changed_meanwhile" for a in answers if a.status_code == 409
    )
    winner = statuses.index(204)
    # Read from the file itself: ten wrong passwords through /login would meet its throttle.
    written = users.Users.load(str(users_file), True, logging.getLogger(__name__))
    working = [n for n in range(count) if written.authenticate(ALICE["email"], news[n])]
    assert working == [winner]
    assert client.post("/login", json=ALICE | {"password": news[winner]}).status_code == 200
    assert me(client, sessions[winner]).status_code == 200  # the caller's session goes on
    assert [me(client, s).status_code for s in sessions].count(200) == 1
    assert len(users_file.read_text().splitlines()) == 1


@pytest.mark.parametrize(
    "spoil",
    [
        lambda path: path.write_text(path.read_text() + "junk\n"),  # a line no server can read
        lambda path: path.write_bytes(path.read_bytes() + b"\xff\xfe\n"),  # not UTF-8
        lambda path: (path.unlink(), path.mkdir()),  # a folder in its place
        lambda path: path.unlink(),  # gone
    ],
    ids=["malformed", "not-utf-8", "folder", "deleted"],
)
def test_a_file_no_server_can_read_is_503_and_nothing_changes(client, users_file, spoil):
    phone, mine = login(client), login(client)
    spoil(users_file)
    response = change(client, mine)
    assert (response.status_code, response.json["error"]) == (503, "accounts_unavailable")
    assert str(users_file) not in response.json["message"]  # the path is for the log
    assert me(client, phone).status_code == 200  # no session ended for a change not made


def test_a_file_with_a_byte_order_mark_changes_as_any_other(client, users_file):
    users_file.write_bytes(b"\xef\xbb\xbf" + users_file.read_bytes())
    mine = login(client)
    assert change(client, mine).status_code == 204
    assert client.post("/login", json=ALICE | {"password": NEW}).status_code == 200


def refuse_scripts(redis_server):
    """From now on the real Redis refuses Lua scripts, as every change to a session is one;
    reads (a token's session lookup) still work: the store fails in the middle of a request."""
    with redis.Redis(port=redis_server.port) as admin:
        admin.execute_command("ACL", "SETUSER", "default", "-@scripting")


def test_a_store_failing_mid_change_leaves_the_password_as_it_was(users_file, own_redis):
    app = create_app(TEST_CONFIG | {"USERS_FILE": str(users_file), "REDIS_URL": own_redis.url})
    client = app.test_client()
    phone, mine = login(client), login(client)
    before = users_file.read_text()
    refuse_scripts(own_redis)
    response = change(client, mine)
    assert response.status_code == 503 and response.json["error"] == "store_unavailable"
    assert users_file.read_text() == before  # the sessions could not end, so nothing changed
    accounts = users.Users.load(str(users_file), required=True, log=logging.getLogger("t"))
    assert accounts.authenticate("alice@example.com", PASSWORD) is not None
    assert me(client, phone).status_code == 200


def test_the_old_password_on_a_worker_that_has_not_reread_the_file_starts_no_session(
    users_file, redis_url, redis_client
):
    # Two workers on one USERS_FILE and one Redis; the clock stands still, so the second
    # never reaches its next look at the file (once a second) on its own.
    config = TEST_CONFIG | {"USERS_FILE": str(users_file), "REDIS_URL": redis_url}
    with time_machine.travel(1_900_000_000, tick=False):
        changer, stale = create_app(config).test_client(), create_app(config).test_client()
        mine = login(changer)
        assert change(changer, mine).status_code == 204
        for client in (stale, changer):  # the changer's other threads had the old hash too
            refused = client.post("/login", json=ALICE)
            assert refused.status_code == 401, refused.json.get("error")
            assert refused.json["error"] == "invalid_credentials"
        sessions = changer.get(
            "/sessions", headers={"Authorization": f"Bearer {mine['accessToken']}"}
        )
        assert [session["current"] for session in sessions.json["sessions"]] == [True]
        assert login(stale, ALICE | {"password": NEW})  # the new one works at once everywhere


def test_a_login_between_the_sessions_ending_and_the_file_written_ends_too(
    users_file, redis_url, redis_client, monkeypatch
):
    # The change ends the other sessions first (if the store fails, nothing changes), then
    # writes the file. A login on another worker in between still finds the old password
    # there: its session must end with the others.
    config = TEST_CONFIG | {"USERS_FILE": str(users_file), "REDIS_URL": redis_url}
    changer, other = create_app(config), create_app(config).test_client()
    store, in_between = changer.extensions["store"], []
    end_all = store.end_all

    def then_a_login(*args, **kwargs):
        ended = end_all(*args, **kwargs)
        if not in_between:  # the first ending, before the write
            in_between.append(login(other))
        return ended

    monkeypatch.setattr(store, "end_all", then_a_login)
    mine = login(changer.test_client())
    assert change(changer.test_client(), mine).status_code == 204
    assert me(other, in_between[0]).status_code == 401
    refreshed = other.post("/token", json={"refreshToken": in_between[0]["refreshToken"]})
    assert refreshed.status_code == 403
    assert me(other, mine).status_code == 200


def test_under_granian_workers_the_callers_session_outlives_every_workers_reread(
    tmp_path, start_cluster
):
    path = tmp_path / "users.txt"
    path.write_text(f"alice@example.com:{users.hash_password(PASSWORD)}\n")
    # A cap above the logins this test makes: an evicted session would read as one ended.
    url, _ = start_cluster(**LIVE, USERS_FILE=str(path), MAX_SESSIONS_PER_USER="1000")
    other, mine = (call(url, "POST", "/login", ALICE)[2] for _ in range(2))
    body = {"currentPassword": PASSWORD, "newPassword": NEW}
    assert call(url, "POST", "/password", body, token=mine["accessToken"])[0] == 204
    assert call(url, "GET", "/me", token=other["accessToken"])[0] == 401
    new = ALICE | {"password": NEW}
    # Until every worker has read the new file: the new password works on each of them...
    assert eventually(lambda: all(call(url, "POST", "/login", new)[0] == 200 for _ in range(10)))
    # ...and none of them, reading it, ended the session that made the change.
    assert all(call(url, "GET", "/me", token=mine["accessToken"])[0] == 200 for _ in range(10))
    refreshed = call(url, "POST", "/token", {"refreshToken": mine["refreshToken"]})
    assert refreshed[0] == 200
