"""Accounts: who may log in, their password hashes, and the `users` command line.

USERS_FILE holds one account a line, ``email:password-hash`` (the htpasswd idea). Blank lines and
lines starting with ``#`` are ignored; emails compare case-insensitively. Manage it with
``flask --app server users add EMAIL``, ``users list`` and ``users remove EMAIL``.
"""

import base64
import hashlib
import logging
import os
import re
import secrets
import stat
import tempfile
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

import argon2
import click
from flask import Flask, current_app
from flask.cli import AppGroup
from werkzeug.security import check_password_hash

from errors import APIError
from settings import ConfigError
from store import get_store

# OWASP Password Storage Cheat Sheet: Argon2id at its first recommended setting,
# m = 19 MiB, t = 2, p = 1: tens of milliseconds a hash, a tenth of the scrypt used before.
PASSWORD_HASHER = argon2.PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
ARGON2ID = "$argon2id$"
# The hashes that verify: Argon2id as argon2-cffi writes it, or Werkzeug's scrypt or pbkdf2.
USABLE_HASH = re.compile(
    r"\$argon2id\$v=19\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+"
    r"|(scrypt:\d+:\d+:\d+|pbkdf2:sha(1|224|256|384|512):\d+)\$[A-Za-z0-9]+\$[0-9a-f]+"
)
# RFC 5321 §4.5.3.1.3: a path is at most 256 octets, so an address at most 254 characters.
MAX_EMAIL_LENGTH = 254
# OWASP Authentication Cheat Sheet: allow long passphrases, but not input without bound.
MAX_PASSWORD_LENGTH = 1024
# Seconds a login waits for a hashing slot before it is told to come back.
SLOT_WAIT = 2
T = TypeVar("T")


def hash_password(password: str) -> str:
    """Return the Argon2id hash of a password, with a random salt of its own."""
    return PASSWORD_HASHER.hash(password)


@dataclass(frozen=True)
class User:
    id: str
    email: str  # lower-cased
    password_hash: str


class HashingSlots:
    """A few threads of their own for password checks, and a wait for a free one.

    OWASP Password Storage Cheat Sheet: memory-hard hashing (19 MiB a check) must not exhaust
    memory. The threads bound how many checks run at once, and also how much memory stays
    behind, since the C allocator keeps an arena per thread that has hashed.
    """

    def __init__(self, size: int) -> None:
        self._slots = threading.BoundedSemaphore(size)
        self._threads = ThreadPoolExecutor(size, thread_name_prefix="password-check")
        weakref.finalize(self, self._threads.shutdown, wait=False)

    def run(self, check: Callable[[], T]) -> T:
        """Run ``check`` on a hashing thread once a slot is free, or answer 503 if none frees up."""
        if not self._slots.acquire(timeout=SLOT_WAIT):
            message = "Too many logins are being checked right now. Try again in a second."
            raise APIError(503, "server_busy", message, {"Retry-After": "1"})
        try:
            return self._threads.submit(check).result()
        finally:
            self._slots.release()


class Users:
    """The accounts that may log in: those of USERS_FILE, and any added in memory (the demo)."""

    def __init__(self, path: str | None, log: logging.Logger, max_concurrent: int = 2) -> None:
        self.hashing = HashingSlots(max_concurrent)  # MAX_CONCURRENT_LOGINS
        self._path = path
        self._log = log
        self._by_email: dict[str, User] = {}
        self._by_id: dict[str, User] = {}
        self._in_file: set[str] = set()  # ids of the accounts that have a line in USERS_FILE
        self._lock = threading.Lock()
        # OWASP Authentication Cheat Sheet: an unknown email costs the same hashing work as a
        # wrong password, so the timing does not tell which emails have accounts.
        self._decoy_hash = hash_password(secrets.token_urlsafe(16))

    @classmethod
    def load(
        cls, path: str | None, required: bool, log: logging.Logger, max_concurrent: int = 2
    ) -> "Users":
        """Read the accounts of USERS_FILE; without it, fail if ``required``, else warn."""
        users = cls(path, log, max_concurrent)
        if path is None:
            if required:
                raise ConfigError("USERS_FILE is not set, and the accounts must come from it.")
            return users
        lines = _file_lines(path)
        if lines is None:
            if required:
                raise ConfigError(
                    f"USERS_FILE {path} does not exist: `flask --app server users add EMAIL` "
                    "creates it."
                )
            log.warning("USERS_FILE %s does not exist: no accounts are read from it.", path)
            return users
        for _, email, password_hash in _accounts(path, lines).values():
            user = User(_user_id(email), email.lower(), password_hash)
            users._by_email[user.email] = users._by_id[user.id] = user
            users._in_file.add(user.id)
        return users

    def add(self, email: str, password: str) -> User:
        """Add an account in memory only (the demo's); ValueError if the email has one."""
        user = User(_user_id(email), email.lower(), hash_password(password))
        with self._lock:
            if user.email in self._by_email:
                raise ValueError(f"{email} already has an account.")
            self._by_email[user.email] = self._by_id[user.id] = user
        return user

    def authenticate(self, email: str, password: str) -> User | None:
        """Return the user these credentials belong to, or None; checked on a hashing slot."""
        return self.hashing.run(lambda: self._check(email, password))

    def _check(self, email: str, password: str) -> User | None:
        user = self._by_email.get(email.lower())
        if user is None:
            _verify(self._decoy_hash, password)  # the same work as for a known email
            return None
        if not _verify(user.password_hash, password):
            return None
        if _needs_rehash(user.password_hash):
            return self._rehash(user, password)
        return user

    def __len__(self) -> int:
        """Count the accounts."""
        return len(self._by_id)

    def get(self, user_id: str) -> User | None:
        """Return the user with this id, or None."""
        return self._by_id.get(user_id)

    def _rehash(self, user: User, password: str) -> User:
        """Replace an older hash of a password that just verified by an Argon2id one."""
        # OWASP Password Storage Cheat Sheet: upgrade a legacy hash at the next successful login.
        upgraded = replace(user, password_hash=hash_password(password))
        with self._lock:
            if self._by_id[user.id] is not user:  # another request upgraded it meanwhile
                return self._by_id[user.id]
            self._by_email[user.email] = self._by_id[user.id] = upgraded
            self._log.info("Upgraded the password hash of account %s to Argon2id.", user.id)
            if user.id in self._in_file:
                self._rewrite_line(user, upgraded.password_hash)
        return upgraded

    def _rewrite_line(self, user: User, new_hash: str) -> None:
        """Put the new hash on the account's line; if that fails, it stays in memory only."""
        assert self._path is not None  # only accounts of the file are rewritten
        try:
            lines = _file_lines(self._path) or []
            for index, line in enumerate(lines):
                email, _, password_hash = line.strip().partition(":")
                if email.lower() == user.email and password_hash == user.password_hash:
                    ending = line[len(line.rstrip("\r\n")) :]
                    lines[index] = f"{email}:{new_hash}{ending}"
                    _write_lines(self._path, lines)
                    return
            self._log.warning(
                "USERS_FILE %s no longer has the old line of account %s; its new password hash "
                "is kept in memory only.",
                self._path,
                user.id,
            )
        except (OSError, ConfigError) as error:
            self._log.warning(
                "The new password hash of account %s is kept in memory only: %s", user.id, error
            )


def _user_id(email: str) -> str:
    """Return the account id of an email: the same across restarts, workers and file edits."""
    digest = hashlib.sha256(email.lower().encode()).digest()
    return base64.urlsafe_b64encode(digest)[:16].decode()


def _verify(password_hash: str, password: str) -> bool:
    """Check a password against an Argon2id hash, or an older one of Werkzeug's."""
    if not password_hash.startswith(ARGON2ID):
        return check_password_hash(password_hash, password)
    try:
        return PASSWORD_HASHER.verify(password_hash, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def _needs_rehash(password_hash: str) -> bool:
    """Tell whether a hash is older than Argon2id at the parameters of PASSWORD_HASHER."""
    return not password_hash.startswith(ARGON2ID) or PASSWORD_HASHER.check_needs_rehash(
        password_hash
    )


def _file_lines(path: str) -> list[str] | None:
    """Return the lines of USERS_FILE with their endings, or None if there is no such file."""
    try:
        with open(path, encoding="utf-8", newline="") as file:
            return file.readlines()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ConfigError(f"USERS_FILE {path} cannot be read: {error.strerror}.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"USERS_FILE {path} is not UTF-8 text.") from None


def _accounts(path: str, lines: list[str]) -> dict[str, tuple[int, str, str]]:
    """Return {lower-cased email: (line number, email, hash)}; ConfigError names a bad line."""
    accounts: dict[str, tuple[int, str, str]] = {}
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        email, colon, password_hash = line.partition(":")
        # Name the line, never show it: it may hold a hash, or a password typed by mistake.
        problem = _line_problem(email, colon, password_hash)
        if email.lower() in accounts:
            problem = f"the same email as line {accounts[email.lower()][0]}"
        if problem:
            raise ConfigError(f"USERS_FILE {path}, line {number}: {problem}.")
        accounts[email.lower()] = (number, email, password_hash)
    return accounts


def _line_problem(email: str, colon: str, password_hash: str) -> str | None:
    """Say why a line of USERS_FILE is not an account, or return None."""
    if not colon:
        return "it is not 'email:password-hash'"
    if not USABLE_HASH.fullmatch(password_hash):
        return "the hash is neither Argon2id nor Werkzeug's scrypt or pbkdf2"
    return _email_problem(email)


def _email_problem(email: str) -> str | None:
    """Say why an email cannot sit on a line of USERS_FILE, or return None."""
    if not email:
        return "the email is empty"
    if len(email) > MAX_EMAIL_LENGTH:
        return f"the email is longer than {MAX_EMAIL_LENGTH} characters"
    if email.startswith("#") or any(c == ":" or c.isspace() or not c.isprintable() for c in email):
        return "the email starts with '#' or holds ':', a space or a control character"
    return None


def _write_lines(path: str, lines: list[str]) -> None:
    """Replace the file's content at once (a reader sees the old or the new), keeping its mode."""
    path = os.path.realpath(path)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    descriptor, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".users-")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="") as file:
            file.writelines(lines)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except OSError:
        os.unlink(temporary)
        raise


users_cli = AppGroup("users", help="Add, list and remove the accounts of USERS_FILE.")


@users_cli.command("add")
@click.argument("email")
def add_user(email: str) -> None:
    """Add an account to USERS_FILE, asking for its password twice."""
    path = _users_file()
    lines = _file_lines(path) or []
    problem = _email_problem(email)
    if problem:
        raise click.ClickException(f"Cannot add this email: {problem}.")
    if email.lower() in _accounts(path, lines):
        raise click.ClickException(f"{email} already has an account in {path}.")
    password = click.prompt(
        f"Password for {email}",
        hide_input=True,
        confirmation_prompt=True,
        default="",  # so that an empty password reaches the check, which says what is wrong
        show_default=False,
        value_proc=_checked_password,
    )
    line = f"{email}:{hash_password(password)}\n"
    if lines and not lines[-1].endswith("\n"):
        line = "\n" + line
    # CWE-732: a file of password hashes is created readable by its owner only.
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(descriptor, "a", encoding="utf-8") as file:
        file.write(line)
    click.echo(f"Added {email} to {path}.")


@users_cli.command("list")
def list_users() -> None:
    """Print the email of every account in USERS_FILE, one a line."""
    path = _users_file()
    lines = _file_lines(path)
    if lines is None:
        raise click.ClickException(f"USERS_FILE {path} does not exist; `users add` creates it.")
    for _, email, _ in _accounts(path, lines).values():
        click.echo(email)


@users_cli.command("remove")
@click.argument("email")
def remove_user(email: str) -> None:
    """Remove the account of EMAIL from USERS_FILE."""
    path = _users_file()
    lines = _file_lines(path) or []
    account = _accounts(path, lines).get(email.lower())
    if account is None:
        raise click.ClickException(f"{path} has no account for {email}.")
    del lines[account[0] - 1]
    _write_lines(path, lines)
    # OWASP ASVS 3.3.3: the account's sessions end with it (those in Redis, shared by all).
    ended = get_store().end_all(_user_id(email))
    click.echo(
        f"Removed {email} from {path} and ended {len(ended)} of its sessions in the store; "
        "a running server forgets the account when restarted."
    )


def _users_file() -> str:
    """Return the path in USERS_FILE, or stop with a message saying how to set it."""
    path = current_app.config.get("USERS_FILE")
    if not path:
        raise click.ClickException(
            "Set USERS_FILE to the accounts file, e.g. USERS_FILE=users.txt (in .env or the "
            "environment)."
        )
    return path


def _checked_password(password: str) -> str:
    """Return the password typed at the prompt; BadParameter makes click ask again."""
    if not password:
        raise click.BadParameter("The password is empty.")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise click.BadParameter(f"The password is longer than {MAX_PASSWORD_LENGTH} characters.")
    return password


def init_app(app: Flask) -> None:
    """Read the accounts of USERS_FILE, add the demo account where the settings say, and add
    the ``flask users`` commands."""
    config = app.config
    # The `flask users` commands must run before the file exists: they create it.
    from_cli = click.get_current_context(silent=True) is not None and not config["SERVER"]
    path = config["USERS_FILE"]
    production = config["APP_ENV"] == "production"
    required = production and path is not None and not from_cli
    users = Users.load(path, required, app.logger, config["MAX_CONCURRENT_LOGINS"])
    if config["DEMO_USER_PASSWORD"]:
        try:
            users.add(config["DEMO_USER_EMAIL"], config["DEMO_USER_PASSWORD"])
        except ValueError:
            raise ConfigError("DEMO_USER_EMAIL already has an account in USERS_FILE.") from None
    if production and not from_cli and not len(users):
        raise ConfigError(
            "Production has no accounts: set USERS_FILE to a file that "
            "`flask --app server users add EMAIL` fills."
        )
    app.extensions["users"] = users
    app.cli.add_command(users_cli)


def get_users() -> Users:
    """Return the app's accounts."""
    return current_app.extensions["users"]
