"""Accounts that live: USERS_FILE changes reach running servers within a second, never read
half-written, never losing a change, and a broken file keeps the last good accounts."""

import logging
import os
import re
import stat
import subprocess
import sys
import threading

import pytest
import time_machine

import users
from server import create_app
from store import MemoryStore, Policy
from users import Users

from .conftest import LIVE, TEST_CONFIG, call, eventually, released_together, user_env

LOG = logging.getLogger("test_users_live")
PASSWORD = "correct horse battery"
NEW_PASSWORD = "a brand new passphrase"


def watched(users_file, ended):
    """The accounts of users_file, noting in `ended` each account whose sessions they end."""
    return Users.load(
        str(users_file), required=True, log=LOG, ended=lambda user_id, _: ended.append(user_id)
    )


def line(email, password=PASSWORD):
    return f"{email}:{users.hash_password(password)}\n"


@pytest.fixture
def users_file(tmp_path):
    path = tmp_path / "users.txt"
    path.write_text(line("alice@example.com"))
    return path


def replace_file(path, text):
    """Write a new file and rename it over the old, as the `users` commands do."""
    temporary = path.with_name(".new")
    temporary.write_text(text)
    os.replace(temporary, path)


def test_a_change_is_seen_after_a_second_not_before(users_file):
    with time_machine.travel(1_800_000_000, tick=False) as clock:
        accounts = Users.load(str(users_file), required=True, log=LOG)
        replace_file(users_file, line("alice@example.com") + line("dave@example.com"))
        assert accounts.authenticate("dave@example.com", PASSWORD) is None  # not looked yet
        clock.shift(1)
        dave = accounts.authenticate("dave@example.com", PASSWORD)
        assert dave is not None and accounts.get(dave.id) == dave


def test_looks_at_the_file_at_most_once_a_second(users_file, monkeypatch):
    looks = []
    real_stat = os.stat

    def counted_stat(path, *args, **kwargs):
        if str(path) == str(users_file):  # os.stat is everyone's: count only this file's
            looks.append(str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(users.os, "stat", counted_stat)
    with time_machine.travel(1_800_000_000, tick=False) as clock:
        accounts = Users.load(str(users_file), required=True, log=LOG)
        alice = users._user_id("alice@example.com")
        for _ in range(100):
            assert accounts.get(alice) is not None
        assert looks == []
        clock.shift(1)
        released_together(16, lambda n: accounts.get(alice))
        assert looks == [str(users_file)]  # sixteen requests at once, one stat


def test_threads_released_together_while_the_file_changes_see_old_or_new(users_file):
    with time_machine.travel(1_800_000_000, tick=False) as clock:
        accounts = Users.load(str(users_file), required=True, log=LOG)
        clock.shift(1)
        alice = users._user_id("alice@example.com")

        def request(n):
            if n == 0:
                replace_file(users_file, line("bob@example.com"))
            return accounts.get(alice)

        results = released_together(24, request)
        assert all(result is None or result.email == "alice@example.com" for result in results)
        clock.shift(1)
        assert accounts.get(alice) is None  # removed: within a second, every lookup refuses
        assert accounts.get(users._user_id("bob@example.com")) is not None


@pytest.mark.parametrize(
    ("text", "named"),
    [("alice@example.com:not-a-hash\n", "line 1"), (b"\xff", "is not UTF-8 text")],
)
def test_a_broken_file_keeps_the_last_good_accounts_and_logs_once(users_file, caplog, text, named):
    ended = []
    with time_machine.travel(1_800_000_000, tick=False) as clock:
        accounts = watched(users_file, ended)
        temporary = users_file.with_name(".new")
        temporary.write_bytes(text if isinstance(text, bytes) else text.encode())
        os.replace(temporary, users_file)
        for _ in range(5):
            clock.shift(1)
            assert accounts.authenticate("alice@example.com", PASSWORD) is not None
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, errors
        assert str(users_file) in errors[0].getMessage() and named in errors[0].getMessage()
        assert "not-a-hash" not in caplog.text
        assert ended == []  # a broken file ends no session
        replace_file(users_file, line("bob@example.com"))  # fixed, and alice removed
        clock.shift(1)
        assert accounts.authenticate("alice@example.com", PASSWORD) is None
        assert ended == [users._user_id("alice@example.com")]


def test_a_deleted_file_keeps_the_accounts_and_says_so_once(users_file, caplog):
    with time_machine.travel(1_800_000_000, tick=False) as clock:
        accounts = Users.load(str(users_file), required=True, log=LOG)
        users_file.unlink()
        for _ in range(3):
            clock.shift(1)
            assert accounts.authenticate("alice@example.com", PASSWORD) is not None
        assert caplog.text.count("no longer exists") == 1


def test_a_password_changed_elsewhere_ends_the_sessions_held_here(users_file):
    ended = []
    with time_machine.travel(1_800_000_000, tick=False) as clock:
        accounts = watched(users_file, ended)
        replace_file(users_file, line("alice@example.com", NEW_PASSWORD))
        clock.shift(1)
        assert accounts.authenticate("alice@example.com", PASSWORD) is None
        assert accounts.authenticate("alice@example.com", NEW_PASSWORD) is not None
        assert ended == [users._user_id("alice@example.com")]


def test_changes_made_here_end_nothing_on_the_next_read(users_file):
    ended = []
    with time_machine.travel(1_800_000_000, tick=False) as clock:
        accounts = watched(users_file, ended)
        alice = accounts.authenticate("alice@example.com", PASSWORD)
        assert accounts.change_password(alice, PASSWORD, NEW_PASSWORD, lambda: "ended") == "ended"
        clock.shift(1)
        assert accounts.authenticate("alice@example.com", NEW_PASSWORD) is not None
        assert ended == []


def test_concurrent_changes_are_all_kept(users_file):
    accounts = Users.load(str(users_file), required=True, log=LOG)
    lines = [line(f"user{n}@example.com") for n in range(12)]

    def add(n):
        with users.editing(str(users_file)) as current:
            current.append(lines[n])

    released_together(12, add)
    text = users_file.read_text()
    assert all(each in text for each in lines)
    assert text.startswith("alice@example.com:")
    assert accounts is not None


def test_a_new_file_is_for_its_owner_and_a_rewrite_keeps_the_mode(tmp_path, users_file):
    fresh = tmp_path / "new.txt"
    with users.editing(str(fresh)) as lines:
        lines.append(line("alice@example.com"))
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    users_file.chmod(0o640)
    with users.editing(str(users_file)) as lines:
        lines.append(line("bob@example.com"))
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "new.txt", "new.txt.lock", "users.txt", "users.txt.lock",
    ]  # fmt: skip


def test_a_read_only_file_is_not_replaced(users_file):
    users_file.chmod(0o400)
    before = users_file.read_text()
    with pytest.raises(PermissionError), users.editing(str(users_file)) as lines:
        lines.append(line("bob@example.com"))
    assert users_file.read_text() == before


def test_memory_store_sessions_of_a_removed_account_end_on_the_next_read(tmp_path):
    """With the in-memory store the `users remove` command cannot reach the server's sessions:
    the server ends them itself, so an account added again later has no old session back."""
    from server import create_app

    path = tmp_path / "users.txt"
    path.write_text(line("carol@example.com"))
    with time_machine.travel(1_800_000_000, tick=False) as clock:
        app = create_app(TEST_CONFIG | {"USERS_FILE": str(path)})
        client = app.test_client()
        tokens = client.post(
            "/login", json={"email": "carol@example.com", "password": PASSWORD}
        ).json
        store = app.extensions["store"]
        assert isinstance(store, MemoryStore) and len(store) == 1
        replace_file(path, "")
        clock.shift(1)
        answer = client.get("/me", headers={"Authorization": f"Bearer {tokens['accessToken']}"})
        assert answer.status_code == 401
        assert answer.json["message"] == (
            "The access token is not valid: its account no longer exists. Log in again."
        )
        replace_file(path, line("carol@example.com"))  # carol is back: her old session is not
        clock.shift(1)
        answer = client.get("/me", headers={"Authorization": f"Bearer {tokens['accessToken']}"})
        assert answer.status_code == 401
        assert Policy is not None


def flask_users(env, cwd, *args, input=None):
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "server", "users", *args],
        input=input, env=env, cwd=cwd, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_the_commands_reach_every_granian_worker_without_a_restart(
    tmp_path, start_cluster, redis_url
):
    """`users add`, `passwd` and `remove` on a file that two granian workers read: each change
    is seen by every worker within about a second, and the sessions end with Redis's help."""
    path = tmp_path / "users.txt"
    env = user_env(**TEST_CONFIG, APP_ENV="production", USERS_FILE=str(path), REDIS_URL=redis_url)
    added = flask_users(env, tmp_path, "add", "alice@example.com", input=f"{PASSWORD}\n" * 2)
    assert added.returncode == 0, added.stderr
    # No warning that does not apply to the command: getpass's about echo only (no terminal).
    assert "does not exist" not in added.stderr and "random" not in added.stderr
    url, _ = start_cluster(**LIVE, USERS_FILE=str(path))
    dave = {"email": "dave@example.com", "password": PASSWORD}
    assert call(url, "POST", "/login", dave)[0] == 401

    assert (
        flask_users(env, tmp_path, "add", "dave@example.com", input=f"{PASSWORD}\n" * 2).returncode
        == 0
    )
    # Each worker must see dave: ten logins in a row land on both.
    assert eventually(lambda: all(call(url, "POST", "/login", dave)[0] == 200 for _ in range(10)))

    tokens = call(url, "POST", "/login", dave)[2]
    changed = flask_users(
        env, tmp_path, "passwd", "dave@example.com", input=f"{NEW_PASSWORD}\n" * 2
    )
    assert changed.returncode == 0, changed.stderr
    # Every login of dave so far: ten or more while waiting for both workers, and one more.
    ended = re.search(r"Ended its (\d+) sessions in the shared store", changed.stdout)
    assert ended and int(ended[1]) >= 11, changed.stdout
    assert call(url, "GET", "/me", token=tokens["accessToken"])[0] == 401  # at once: Redis
    new = dave | {"password": NEW_PASSWORD}
    assert eventually(lambda: all(call(url, "POST", "/login", new)[0] == 200 for _ in range(10)))
    tokens = call(url, "POST", "/login", new)[2]

    removed = flask_users(env, tmp_path, "remove", "dave@example.com")
    assert removed.returncode == 0, removed.stderr
    assert call(url, "GET", "/me", token=tokens["accessToken"])[0] == 401
    assert eventually(lambda: all(call(url, "POST", "/login", new)[0] == 401 for _ in range(10)))


@pytest.mark.parametrize("algorithm", ["HS256", "EdDSA"])
def test_users_add_in_development_prints_no_warning_that_does_not_apply(tmp_path, algorithm):
    path = tmp_path / "users.txt"
    # Development, random secrets (and with EdDSA, a key pair made for the process), no file yet.
    env = user_env(USERS_FILE=str(path), ACCESS_TOKEN_ALGORITHM=algorithm)
    added = flask_users(env, tmp_path, "add", "alice@example.com", input=f"{PASSWORD}\n" * 2)
    assert added.returncode == 0, added.stderr
    assert "random secrets" not in added.stderr and "does not exist" not in added.stderr
    assert "key pair made for this process" not in added.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    served = subprocess.run(
        [sys.executable, "-c", "import server; server.create_app()"],
        env=user_env(ACCESS_TOKEN_ALGORITHM=algorithm), cwd=tmp_path, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert "random secrets" in served.stderr  # a server still says so
    if algorithm == "EdDSA":
        assert "key pair made for this process" in served.stderr


@pytest.mark.parametrize("kind", ["fifo", "device", "folder", "oversized"])
def test_what_is_no_regular_file_is_refused_at_once_and_later_changes_still_arrive(
    users_file, caplog, kind
):
    with time_machine.travel(1_800_000_000, tick=False) as clock:
        accounts = Users.load(str(users_file), required=True, log=LOG)
        users_file.unlink()
        if kind == "fifo":
            os.mkfifo(users_file, 0o600)  # an open that waited would hang every later look
        elif kind == "device":
            users_file.symlink_to("/dev/zero")  # endless
        elif kind == "folder":
            users_file.mkdir()
        else:
            with open(users_file, "wb") as file:
                file.truncate(users.MAX_USERS_FILE + 1)  # sparse: no disk spent
        clock.shift(1)
        looked = threading.Thread(
            target=lambda: accounts.authenticate("alice@example.com", PASSWORD), daemon=True
        )
        looked.start()
        looked.join(timeout=10)
        assert not looked.is_alive(), "a look at USERS_FILE hung"
        assert accounts.authenticate("alice@example.com", PASSWORD) is not None  # kept
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and str(users_file) in errors[0], errors
        # The file comes back, with a new account: it arrives, as any change does.
        users_file.rmdir() if users_file.is_dir() else users_file.unlink()
        replace_file(users_file, line("alice@example.com") + line("dave@example.com"))
        clock.shift(1)
        assert accounts.authenticate("dave@example.com", PASSWORD) is not None


def test_a_byte_order_mark_is_no_part_of_the_first_email(users_file):
    with time_machine.travel(1_800_000_000, tick=False) as clock:
        accounts = Users.load(str(users_file), required=True, log=LOG)
        replace_file(users_file, "\ufeff" + line("alice@example.com") + line("dave@example.com"))
        clock.shift(1)
        assert accounts.authenticate("alice@example.com", PASSWORD) is not None
        assert accounts.authenticate("dave@example.com", PASSWORD) is not None


def test_an_account_removed_by_hand_ends_its_sessions_in_a_shared_store(
    tmp_path, redis_url, redis_client
):
    path = tmp_path / "users.txt"
    path.write_text(line("alice@example.com"))
    config = TEST_CONFIG | {"USERS_FILE": str(path), "REDIS_URL": redis_url}
    with time_machine.travel(1_800_000_000, tick=False) as clock:
        client = create_app(config).test_client()
        alice = {"email": "alice@example.com", "password": PASSWORD}
        tokens = client.post("/login", json=alice).json
        me = {"Authorization": f"Bearer {tokens['accessToken']}"}
        assert client.get("/me", headers=me).status_code == 200
        replace_file(path, "")  # removed by hand, not by the command
        clock.shift(1)
        assert client.get("/me", headers=me).status_code == 401
        replace_file(path, line("alice@example.com"))  # back, or a new person of that email
        clock.shift(1)
        assert client.get("/me", headers=me).status_code == 401
        assert (
            client.post("/token", json={"refreshToken": tokens["refreshToken"]}).status_code == 403
        )
