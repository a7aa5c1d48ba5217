import logging
import os
import stat
import subprocess
import sys
import time

import argon2
import pytest
import redis
import time_machine
from flask import Flask
from werkzeug.security import generate_password_hash

import users
from server import create_app
from settings import ConfigError
from store import MemoryStore, Policy
from users import Users, users_cli

from .conftest import DEMO, TEST_CONFIG

# Taken when this module is imported, before conftest's autouse fixture swaps in a cheap one.
SHIPPED_HASHER = users.PASSWORD_HASHER
OWASP_PREFIX = "$argon2id$v=19$m=19456,t=2,p=1$"
LOG = logging.getLogger("test_users")
PASSWORD = "correct horse battery"  # 15 characters or more, and not a common one
TYPED_TWICE = f"{PASSWORD}\n{PASSWORD}\n"


class SpyHasher:
    """Hashes and verifies as the wrapped hasher does; counts its hashes, records each hash it
    verifies."""

    def __init__(self, hasher):
        self.hasher = hasher
        self.hashed = 0
        self.verified = []

    def hash(self, password):
        self.hashed += 1
        return self.hasher.hash(password)

    def verify(self, password_hash, password):
        self.verified.append(password_hash)
        return self.hasher.verify(password_hash, password)

    def check_needs_rehash(self, password_hash):
        return self.hasher.check_needs_rehash(password_hash)


def write(tmp_path, text, mode=0o600):
    path = tmp_path / "users.txt"
    path.write_text(text)
    path.chmod(mode)
    return path


def load(path, required=True):
    return Users.load(str(path), required=required, log=LOG)


def test_hashes_with_argon2id_at_owasp_parameters(monkeypatch):
    monkeypatch.setattr(users, "PASSWORD_HASHER", SHIPPED_HASHER)
    password_hash = users.hash_password("correct horse")
    assert password_hash.startswith(OWASP_PREFIX)
    assert password_hash != users.hash_password("correct horse")  # a salt of its own
    user = Users.load(None, required=False, log=LOG).add("alice@example.com", "correct horse")
    assert user.password_hash.startswith(OWASP_PREFIX)


def test_unknown_email_verifies_once_against_a_decoy_of_the_same_parameters(monkeypatch):
    spy = SpyHasher(SHIPPED_HASHER)
    monkeypatch.setattr(users, "PASSWORD_HASHER", spy)
    accounts = Users.load(None, required=False, log=LOG)
    alice = accounts.add("alice@example.com", "correct horse")

    assert accounts.authenticate("nobody@example.com", "correct horse") is None
    assert len(spy.verified) == 1
    assert spy.verified[0].startswith(OWASP_PREFIX)
    assert spy.verified[0] != alice.password_hash

    assert accounts.authenticate("alice@example.com", "wrong") is None
    assert spy.verified[1:] == [alice.password_hash]


def test_the_decoy_is_made_once_at_the_parameters_of_the_hasher(monkeypatch):
    # The shipped decoy has the shipped parameters: no process start spends a hash on it.
    spy = SpyHasher(SHIPPED_HASHER)
    monkeypatch.setattr(users, "PASSWORD_HASHER", spy)
    Users.load(None, required=False, log=LOG)
    assert spy.hashed == 0
    assert users.DECOY_HASH.startswith(OWASP_PREFIX)
    assert not SHIPPED_HASHER.check_needs_rehash(users.DECOY_HASH)
    # A whole hash, whose check is the full work: one cut short fails at once, and the timing
    # would tell which emails have accounts.
    with pytest.raises(argon2.exceptions.VerifyMismatchError):
        SHIPPED_HASHER.verify(users.DECOY_HASH, "correct horse")
    # Other parameters get a decoy of their own, made at once, not at the first unknown email.
    other = argon2.PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    spy = SpyHasher(other)
    monkeypatch.setattr(users, "PASSWORD_HASHER", spy)
    accounts = Users.load(None, required=False, log=LOG)
    assert spy.hashed == 1
    assert accounts.authenticate("nobody@example.com", "correct horse") is None
    assert spy.hashed == 1 and not other.check_needs_rehash(spy.verified[0])


def test_the_well_known_demo_password_costs_no_hash_at_start(monkeypatch):
    # Every development start, and each granian worker, adds the demo account: its password is
    # public, so its hash ships too. A demo password of one's own is hashed, salted, at start.
    spy = SpyHasher(SHIPPED_HASHER)
    monkeypatch.setattr(users, "PASSWORD_HASHER", spy)
    demo = create_app(TEST_CONFIG).extensions["users"]  # development: the well-known password
    assert spy.hashed == 0
    assert demo.authenticate(DEMO["email"], DEMO["password"]) is not None
    assert demo.authenticate(DEMO["email"], DEMO["password"] + "!") is None
    assert not SHIPPED_HASHER.check_needs_rehash(spy.verified[0])
    chosen = create_app(TEST_CONFIG | {"DEMO_USER_PASSWORD": "a long chosen password"})
    assert spy.hashed == 1
    assert chosen.extensions["users"].authenticate(DEMO["email"], "a long chosen password")
    assert chosen.extensions["users"].authenticate(DEMO["email"], DEMO["password"]) is None
    # Other parameters (the suite's cheap ones, say) get the demo's hash made at theirs.
    cheap = argon2.PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    monkeypatch.setattr(users, "PASSWORD_HASHER", cheap)
    demo = create_app(TEST_CONFIG).extensions["users"].fresh().by_email[DEMO["email"]]
    assert not cheap.check_needs_rehash(demo.password_hash)


@pytest.mark.parametrize("seen_first", [False, True], ids=["unseen", "seen-by-another-thread"])
def test_a_password_that_verified_no_longer_holds_once_the_file_says_otherwise(
    tmp_path, seen_first
):
    # What a login asks once its session is started (Users.still_holds): the file may have
    # changed since the password was checked, and another thread may have read it already.
    path = tmp_path / "users.txt"
    path.write_text(f"alice@example.com:{users.hash_password(PASSWORD)}\nbob@example.com:"
                    f"{users.hash_password(PASSWORD)}\n")  # fmt: skip
    accounts = Users.load(str(path), required=True, log=LOG)
    alice, bob = (
        accounts.authenticate(f"{name}@example.com", PASSWORD) for name in ("alice", "bob")
    )
    assert accounts.still_holds(alice, PASSWORD) and accounts.still_holds(bob, PASSWORD)
    path.write_text(f"bob@example.com:{users.hash_password('another long passphrase')}\n")
    if seen_first:  # another thread's look, a second on
        with time_machine.travel(time.time() + 2 * users.RELOAD_INTERVAL):
            assert alice.id not in accounts.fresh().by_id
    assert not accounts.still_holds(alice, PASSWORD)  # removed
    assert not accounts.still_holds(bob, PASSWORD)  # changed
    assert accounts.still_holds(accounts.get(bob.id), "another long passphrase")


def test_logs_in_case_insensitively_and_finds_the_user_by_id():
    accounts = Users.load(None, required=False, log=LOG)
    alice = accounts.add("Alice@Example.com", "correct horse")
    assert alice.email == "alice@example.com"
    assert accounts.authenticate("ALICE@example.COM", "correct horse") == alice
    assert accounts.authenticate("alice@example.com", "Correct horse") is None
    assert accounts.get(alice.id) == alice
    assert accounts.get("no-such-id") is None
    with pytest.raises(ValueError):
        accounts.add("alice@EXAMPLE.com", "another")


@pytest.mark.parametrize("method", ["scrypt:1024:8:1", "pbkdf2:sha256:1000"])
def test_old_werkzeug_hash_verifies_and_is_upgraded_in_the_file(tmp_path, method):
    old = generate_password_hash("old secret", method=method)
    bob = users.hash_password("bob's secret")
    before = f"# our team\nbob@example.com:{bob}\n\nAlice@Example.com:{old}\r\n# end"
    path = write(tmp_path, before, mode=0o640)
    accounts = load(path)

    assert accounts.authenticate("alice@example.com", "wrong") is None
    assert path.read_bytes() == before.encode()  # a failed login upgrades nothing
    alice = accounts.authenticate("alice@example.com", "old secret")
    assert alice is not None
    assert alice.password_hash.startswith("$argon2id$")
    assert accounts.get(alice.id) == alice

    after = f"# our team\nbob@example.com:{bob}\n\nAlice@Example.com:{alice.password_hash}\r\n# end"
    assert path.read_bytes() == after.encode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["users.txt", "users.txt.lock"]  # no temporary file
    assert load(path).authenticate("alice@example.com", "old secret") == alice


def test_argon2_hash_with_older_parameters_is_upgraded(tmp_path):
    weaker = argon2.PasswordHasher(time_cost=1, memory_cost=16, parallelism=1)
    path = write(tmp_path, f"alice@example.com:{weaker.hash('secret')}\n")
    alice = load(path).authenticate("alice@example.com", "secret")
    assert not users.PASSWORD_HASHER.check_needs_rehash(alice.password_hash)
    assert path.read_text() == f"alice@example.com:{alice.password_hash}\n"


def test_current_hash_is_not_rewritten(tmp_path):
    text = f"alice@example.com:{users.hash_password('secret')}\n"
    path = write(tmp_path, text)
    alice = load(path).authenticate("alice@example.com", "secret")
    assert alice.password_hash in text
    assert path.read_text() == text


@pytest.mark.parametrize("change", ["removed", "edited"])
def test_upgrade_survives_a_file_changed_since_start(tmp_path, caplog, change):
    old = generate_password_hash("old secret", method="scrypt:1024:8:1")
    path = write(tmp_path, f"alice@example.com:{old}\n")
    accounts = load(path)
    edited = f"alice@example.com:{users.hash_password('new secret')}\n"
    if change == "removed":
        path.unlink()
    else:
        path.write_text(edited)

    alice = accounts.authenticate("alice@example.com", "old secret")

    assert alice.password_hash.startswith("$argon2id$")
    assert accounts.authenticate("alice@example.com", "old secret") == alice
    assert "kept in memory only" in caplog.text
    assert alice.password_hash not in caplog.text
    assert (path.read_text() == edited) if change == "edited" else not path.exists()


def test_reads_accounts_skipping_comments_and_blank_lines(tmp_path):
    alice = users.hash_password("alice's secret")
    path = write(tmp_path, f"# accounts\n\n   \nAlice@Example.COM:{alice}\n  # bob left\n")
    accounts = load(path)
    user = accounts.authenticate("alice@example.com", "alice's secret")
    assert user.email == "alice@example.com"
    assert accounts.get(user.id) == user
    assert accounts.authenticate("# accounts", "") is None


def test_ids_are_stable_across_restarts_edits_and_sources(tmp_path):
    secret = users.hash_password("secret")
    first = load(write(tmp_path, f"alice@example.com:{secret}\nbob@example.com:{secret}\n"))
    alice = first.authenticate("alice@example.com", "secret")
    bob = first.authenticate("bob@example.com", "secret")
    assert alice.id != bob.id
    # Alice's line is gone, Carol's comes first, Bob's email is cased differently.
    second = load(write(tmp_path, f"carol@example.com:{secret}\nBOB@example.com:{secret}\n"))
    assert second.authenticate("bob@example.com", "secret").id == bob.id
    in_memory = Users.load(None, required=False, log=LOG).add("ALICE@example.com", "other")
    assert in_memory.id == alice.id


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("alice@example.com", "not 'email:password-hash'"),
        ("alice@example.com:", "neither Argon2id"),
        ("alice@example.com:plain-text-password", "neither Argon2id"),
        ("alice@example.com:$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ", "neither Argon2id"),
        ("alice@example.com:md5$salt$0123abcd", "neither Argon2id"),
        (":{hash}", "the email is empty"),
        ("alice @example.com:{hash}", "a space"),
        ("alice@example.com:{hash}:extra", "neither Argon2id"),
    ],
)
def test_malformed_line_names_file_and_line_but_shows_nothing_of_it(tmp_path, line, problem):
    good = users.hash_password("good")
    line = line.format(hash=users.hash_password("bad"))
    path = write(tmp_path, f"# accounts\nbob@example.com:{good}\n{line}\n")
    with pytest.raises(ConfigError) as raised:
        load(path)
    message = raised.value.message
    assert f"USERS_FILE {path}, line 3: " in message
    assert problem in message
    hidden = line.partition(":")[2]
    assert line not in message
    assert not hidden or hidden not in message


def test_duplicate_email_names_both_lines(tmp_path):
    password_hash = users.hash_password("secret")
    path = write(
        tmp_path, f"alice@example.com:{password_hash}\n\nALICE@example.com:{password_hash}\n"
    )
    with pytest.raises(ConfigError, match=r"line 3: the same email as line 1\."):
        load(path)


def test_unreadable_file_is_a_config_error(tmp_path):
    path = tmp_path / "users.txt"
    path.write_bytes(b"alice@example.com:\xff\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load(path)


def test_missing_file_is_an_error_when_required(tmp_path):
    path = tmp_path / "absent.txt"
    with pytest.raises(ConfigError, match=f"USERS_FILE {path} does not exist"):
        load(path, required=True)
    with pytest.raises(ConfigError, match="USERS_FILE is not set"):
        Users.load(None, required=True, log=LOG)


def test_missing_file_is_a_warning_when_not_required(tmp_path, caplog):
    path = tmp_path / "absent.txt"
    accounts = load(path, required=False)
    assert f"USERS_FILE {path} does not exist" in caplog.text
    assert accounts.authenticate("alice@example.com", "secret") is None


# The `users` command line, on a bare Flask app until server.py registers it.


@pytest.fixture
def users_file(tmp_path):
    return tmp_path / "users.txt"


@pytest.fixture
def cli(users_file):
    app = Flask(__name__)
    app.config["USERS_FILE"] = str(users_file)
    app.extensions["store"] = MemoryStore()
    app.cli.add_command(users_cli)
    runner = app.test_cli_runner()

    def invoke(*args, input=None):
        return runner.invoke(args=["users", *args], input=input)

    invoke.app = app
    return invoke


def test_add_creates_the_file_for_its_owner_only_and_the_account_logs_in(cli, users_file):
    result = cli("add", "Alice@Example.com", input=TYPED_TWICE)
    assert result.exit_code == 0, result.output
    assert f"Added Alice@Example.com to {users_file}." in result.output
    assert PASSWORD not in result.output and "$argon2id$" not in result.output
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    assert load(users_file).authenticate("alice@example.com", PASSWORD) is not None


def test_add_appends_after_a_last_line_without_newline(cli, users_file):
    users_file.write_text("# accounts")
    assert cli("add", "alice@example.com", input=TYPED_TWICE).exit_code == 0
    lines = users_file.read_text().splitlines()
    assert lines[0] == "# accounts" and lines[1].startswith("alice@example.com:$argon2id$")


def test_add_refuses_an_email_that_has_an_account(cli, users_file):
    assert cli("add", "alice@example.com", input=TYPED_TWICE).exit_code == 0
    result = cli("add", "ALICE@example.com", input="another long password\n" * 2)
    assert result.exit_code == 1
    assert f"ALICE@example.com already has an account in {users_file}." in result.output
    assert len(users_file.read_text().splitlines()) == 1


@pytest.mark.parametrize(
    ("email", "problem"),
    [
        ("", "the email is empty"),
        ("a:b@example.com", "holds ':'"),
        ("alice @example.com", "a space"),
        ("alice\x07@example.com", "a control character"),
        ("#alice@example.com", "starts with '#'"),
        ("a" * 245 + "@example.com", "longer than 254"),
    ],
)
def test_add_refuses_an_email_that_cannot_sit_on_a_line(cli, users_file, email, problem):
    result = cli("add", email, input=TYPED_TWICE)
    assert result.exit_code == 1
    assert "Cannot add this email" in result.output and problem in result.output
    assert not users_file.exists()


def test_add_asks_again_when_the_confirmation_differs(cli, users_file):
    result = cli("add", "alice@example.com", input=f"{PASSWORD}\n{PASSWORD[:-1]}\n")
    assert "The two entered values do not match." in result.output
    assert result.exit_code == 1  # no third answer: aborted
    assert not users_file.exists()


@pytest.mark.parametrize(
    ("password", "problem"),
    [("", "The password is empty."), ("x" * 1025, "longer than 1024 characters")],
)
def test_add_refuses_an_empty_or_overlong_password(cli, users_file, password, problem):
    result = cli("add", "alice@example.com", input=f"{password}\n{password}\n")
    assert problem in result.output
    assert result.exit_code == 1
    assert not users_file.exists()


def test_list_prints_emails_only(cli, users_file):
    for email in ("alice@example.com", "Bob@Example.com"):
        assert cli("add", email, input=TYPED_TWICE).exit_code == 0
    with users_file.open("a") as file:
        file.write("# a comment\n")
    result = cli("list")
    assert result.exit_code == 0
    assert result.output == "alice@example.com\nBob@Example.com\n"


def test_list_names_a_malformed_line(cli, users_file):
    users_file.write_text("alice@example.com:not-a-hash\n")
    result = cli("list")
    assert result.exit_code == 1
    assert f"USERS_FILE {users_file}, line 1:" in result.output
    assert "not-a-hash" not in result.output


def test_remove_deletes_only_that_account(cli, users_file):
    for email in ("alice@example.com", "bob@example.com"):
        assert cli("add", email, input=TYPED_TWICE).exit_code == 0
    users_file.write_text("# team\n" + users_file.read_text())
    bob_line = users_file.read_text().splitlines()[2]

    result = cli("remove", "ALICE@example.com")

    assert result.exit_code == 0, result.output
    assert users_file.read_text() == f"# team\n{bob_line}\n"
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    assert cli("list").output == "bob@example.com\n"


def test_remove_refuses_an_email_without_account(cli, users_file):
    assert cli("add", "bob@example.com", input=TYPED_TWICE).exit_code == 0
    before = users_file.read_text()
    result = cli("remove", "alice@example.com")
    assert result.exit_code == 1
    assert f"{users_file} has no account for alice@example.com." in result.output
    assert users_file.read_text() == before


@pytest.mark.parametrize("args", [("add", "alice@example.com"), ("list",), ("remove", "a@b.c")])
def test_commands_without_users_file_say_how_to_set_it(cli, args):
    cli.app.config["USERS_FILE"] = None
    result = cli(*args, input=TYPED_TWICE)
    assert result.exit_code == 1
    assert "Set USERS_FILE to the accounts file, e.g. USERS_FILE=users.txt" in result.output


def test_the_readme_production_path_through_the_real_flask_command(tmp_path, start_cluster):
    """`flask --app server users add` creates the file even with production settings, then
    granian in production logs that account in, and the demo password does not work."""
    from .conftest import call, user_env

    env = user_env(**TEST_CONFIG, APP_ENV="production", USERS_FILE=str(tmp_path / "users.txt"))
    flask = [sys.executable, "-m", "flask", "--app", "server", "users"]
    added = subprocess.run(
        [*flask, "add", "alice@example.com"], input="alice's password\nalice's password\n",
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    listed = subprocess.run(
        [*flask, "list"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert listed.stdout == "alice@example.com\n"
    assert "argon2id" not in listed.stdout + listed.stderr
    url, _ = start_cluster(
        APP_ENV="production", USERS_FILE=str(tmp_path / "users.txt"), DEMO_USER_PASSWORD=""
    )
    alice = {"email": "alice@example.com", "password": "alice's password"}
    assert call(url, "POST", "/login", alice)[0] == 200
    assert call(url, "POST", "/login", DEMO)[0] == 401


def test_remove_with_the_memory_store_does_not_pretend_to_reach_a_server(cli, users_file):
    # The command's own memory store is not a running server's: those end the sessions
    # themselves when they read the file (test_users_live.py).
    assert cli("add", "alice@example.com", input=TYPED_TWICE).exit_code == 0
    store, now = cli.app.extensions["store"], 1_800_000_000
    alice_id = users._user_id("alice@example.com")
    session = Policy().new_session(alice_id, now, "curl", "127.0.0.1")
    store.start(session, now)
    result = cli("remove", "alice@example.com")
    assert result.exit_code == 0, result.output
    assert "Running servers that read it end its sessions within a second." in result.output
    assert "shared store" not in result.output


# The password rules (NIST SP 800-63B-4 §3.1.1.2, ASVS 5.0 V6.2), for the CLI and POST /password.


@pytest.mark.parametrize(
    ("password", "problem"),
    [
        ("fourteen chars", "it has 14 characters and needs at least 15"),
        ("x" * 1025, "longer than 1024 characters"),
        ("Alice@Example.COM", "it is the account's email"),
        ("ＡＬＩＣＥ@ｅｘａｍｐｌｅ.ｃｏｍ", "it is the account's email"),  # fullwidth: NFKC
        ("PolniyPizdec0211", "one of the most common passwords"),  # listed, 16 characters
        ("passwordpasswordpassword", "one of the most common passwords"),  # one, repeated
        ("QWERTYqwertyQWERTY", "one of the most common passwords"),
        ("1" * 18, "one of the most common passwords"),  # "111111" three times
        ("a" * 18, "one of the most common passwords"),
        ("12" * 9, "one of the most common passwords"),  # "121212" three times
        ("abc" * 6, "one of the most common passwords"),  # "abcabc" three times
        ("  alice@example.com  ", "it is the account's email"),  # spaces around it
        ("alice@example.com\u200b", "it is the account's email"),  # a zero-width space
        ("alice @example.com\u00a0", "it is the account's email"),
    ],
)
def test_password_rules_refuse_saying_why(password, problem):
    assert problem in users.password_problem(password, "alice@example.com")


@pytest.mark.parametrize(
    "password",
    [
        "correct horse battery",
        "fifteen chars!!",  # exactly 15
        "ça marche très bien",  # Unicode, spaces: any characters count
        "🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑🔑",  # fifteen code points, each one character
        "alllowercaseletters",  # no composition rules
    ],
)
def test_password_rules_accept_long_passwords_of_any_characters(password):
    assert users.password_problem(password, "alice@example.com") is None


def test_nfkc_counts_what_the_user_sees_as_one_character():
    # "ﬁ" (one ligature code point) is "fi" after NFKC: 14 typed, 15 counted.
    assert users.password_problem("ﬁ" + "x" * 13, "a@b.c") is None
    assert "13 characters" in users.password_problem("e\u0301" * 13, "a@b.c")  # é composed


def test_passwords_are_hashed_normalised_and_typed_either_way_log_in():
    accounts = Users.load(None, required=False, log=LOG)
    accounts.add("alice@example.com", "cafe\u0301 au lait, please")  # é as e + accent
    assert accounts.authenticate("alice@example.com", "café au lait, please") is not None


def test_an_old_hash_of_a_password_not_normalised_still_verifies_and_is_upgraded(tmp_path):
    typed = "ﬁve ﬂights of stairs"  # ligatures: NFKC makes them "fi" and "fl"
    old = f"alice@example.com:{users.PASSWORD_HASHER.hash(typed)}\n"  # hashed as typed
    path = write(tmp_path, old)
    alice = load(path).authenticate("alice@example.com", typed)
    assert alice is not None
    assert users.PASSWORD_HASHER.verify(alice.password_hash, users.normalised(typed))
    assert path.read_text() == f"alice@example.com:{alice.password_hash}\n"  # upgraded
    assert load(path).authenticate("alice@example.com", "five flights of stairs") is not None


def test_the_common_list_names_its_source_and_has_thousands_of_entries():
    lines = users.COMMON_PASSWORDS_FILE.read_text().splitlines()
    assert "SecLists" in lines[0] + lines[1] and lines[0].startswith("#")
    assert len([line for line in lines if not line.startswith("#")]) == 10_000


def test_add_refuses_a_short_password_and_asks_again(cli, users_file):
    result = cli("add", "alice@example.com", input="too short\n" + TYPED_TWICE)
    assert result.exit_code == 0, result.output
    assert "The password cannot be used: it has 9 characters and needs at least 15" in result.output
    assert load(users_file).authenticate("alice@example.com", PASSWORD) is not None


def test_add_refuses_the_email_as_password(cli, users_file):
    email = "alice.long.name@example.com"
    result = cli("add", email, input=f"{email}\n{email}\n")
    assert "it is the account's email" in result.output
    assert not users_file.exists()


def test_passwd_replaces_the_hash_and_keeps_the_other_lines(cli, users_file):
    for email in ("alice@example.com", "bob@example.com"):
        assert cli("add", email, input=TYPED_TWICE).exit_code == 0
    users_file.chmod(0o640)
    bob_line = users_file.read_text().splitlines()[1]
    new = "a brand new passphrase"
    result = cli("passwd", "ALICE@example.com", input=f"{new}\n{new}\n")
    assert result.exit_code == 0, result.output
    assert f"Changed the password of ALICE@example.com in {users_file}." in result.output
    assert "Running servers that read it end its sessions within a second." in result.output
    assert new not in result.output
    accounts = load(users_file)
    assert accounts.authenticate("alice@example.com", PASSWORD) is None
    assert accounts.authenticate("alice@example.com", new) is not None
    assert users_file.read_text().splitlines()[1] == bob_line
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o640


def test_passwd_refuses_an_email_without_account_before_asking(cli, users_file):
    assert cli("add", "bob@example.com", input=TYPED_TWICE).exit_code == 0
    result = cli("passwd", "alice@example.com", input=TYPED_TWICE)
    assert result.exit_code == 1
    assert f"{users_file} has no account for alice@example.com." in result.output
    assert "Password" not in result.output


def test_passwd_on_a_read_only_file_says_so(cli, users_file):
    assert cli("add", "alice@example.com", input=TYPED_TWICE).exit_code == 0
    users_file.chmod(0o400)
    result = cli("passwd", "alice@example.com", input="a brand new passphrase\n" * 2)
    assert result.exit_code == 1
    assert f"USERS_FILE {users_file} cannot be written: Permission denied." in result.output


def test_passwd_and_remove_with_redis_end_the_sessions_in_it(cli, users_file, redis_client):
    from redis_store import RedisStore

    store = cli.app.extensions["store"] = RedisStore(redis_client, Policy())
    assert cli("add", "alice@example.com", input=TYPED_TWICE).exit_code == 0
    now = int(time.time())
    session = Policy().new_session(users._user_id("alice@example.com"), now, "curl", "127.0.0.1")
    store.start(session, now)
    result = cli("passwd", "alice@example.com", input="a brand new passphrase\n" * 2)
    assert "Ended its 1 session in the shared store; its tokens stop working now." in result.output
    assert store.get(session.id, session.user_id, now) is None


def test_passwd_ends_a_session_started_between_its_first_ending_and_the_write(
    cli, users_file, redis_client, monkeypatch
):
    # A server that had not yet seen the change could start one with the old password then.
    from redis_store import RedisStore

    store = cli.app.extensions["store"] = RedisStore(redis_client, Policy())
    assert cli("add", "alice@example.com", input=TYPED_TWICE).exit_code == 0
    now, end_all, in_between = int(time.time()), store.end_all, []

    def then_a_session(user_id, keep=None):
        ended = end_all(user_id, keep)
        if not in_between:  # the first ending, before the file is written
            in_between.append(Policy().new_session(user_id, now, "curl", "127.0.0.1"))
            store.start(in_between[0], now)
        return ended

    monkeypatch.setattr(store, "end_all", then_a_session)
    result = cli("passwd", "alice@example.com", input="a brand new passphrase\n" * 2)
    assert result.exit_code == 0, result.output
    assert store.get(in_between[0].id, in_between[0].user_id, now) is None


def test_passwd_when_the_store_does_not_answer_changes_nothing(cli, users_file, own_redis):
    from redis_store import REDIS_OPTIONS, RedisStore

    # Connected as the service connects (redis_store's options: one retry, no backoff), not
    # with redis-py's defaults, whose backoff alone took some 8 s once the Redis was gone.
    client = redis.Redis(port=own_redis.port, **REDIS_OPTIONS)
    cli.app.extensions["store"] = RedisStore(client, Policy())
    assert cli("add", "alice@example.com", input=TYPED_TWICE).exit_code == 0
    before = users_file.read_text()
    own_redis.stop()
    result = cli("passwd", "alice@example.com", input="a brand new passphrase\n" * 2)
    assert result.exit_code == 1
    assert "The session store does not answer (ConnectionError); nothing changed." in result.output
    assert users_file.read_text() == before
    result = cli("remove", "alice@example.com")
    assert result.exit_code == 1 and users_file.read_text() == before
