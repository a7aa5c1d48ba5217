"""Accounts: who may log in, their password hashes, and the `users` command line.

USERS_FILE holds one account a line, ``email:password-hash`` (the htpasswd idea). Blank lines and
lines starting with ``#`` are ignored; emails compare case-insensitively. Manage it with
``flask --app server users add EMAIL``, ``users list``, ``users passwd EMAIL`` and
``users remove EMAIL``; a user changes their own password with ``POST /password``
(accounts.py).

The file changes while servers run. Every change is a new file renamed over the old, so a
reader sees the old file or the new, never half of one; changes are made under a lock, so two
at once never lose each other's; and every server looks at the file's modification time at most
once a second, reading it again only when it changed (``Users.fresh``).
"""

import base64
import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import math
import os
import re
import secrets
import stat
import tempfile
import threading
import time
import unicodedata
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import argon2
import click
from flask import Flask, current_app
from flask.cli import AppGroup
from werkzeug.security import check_password_hash

from errors import APIError
from settings import DEMO_PASSWORD, ConfigError, app_command
from store import get_store

# OWASP Password Storage Cheat Sheet: Argon2id at its first recommended setting,
# m = 19 MiB, t = 2, p = 1: tens of milliseconds a hash, a tenth of the scrypt used before.
PASSWORD_HASHER = argon2.PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
ARGON2ID = "$argon2id$"
# What an unknown email is checked against: the hash, at PASSWORD_HASHER's parameters, of a
# random password that was thrown away. Made once here, so that no process start spends a hash.
DECOY_HASH = (
    "$argon2id$v=19$m=19456,t=2,p=1$R1S0eRb6o5O1+QKlq7D3RA$"  # parameters, then the salt
    "CJybCzroFqnH2wtjrU9H7LKGNLpuWJJlwFWsoWZzgTg"
)
# The demo account's password is public (the README gives it), so its hash can ship too: no
# development start, nor any granian worker, spends a hash on it.
DEMO_HASH = (
    "$argon2id$v=19$m=19456,t=2,p=1$ieOiRed1BKyiG7ZgTyqpJQ$"
    "3BWhHDdUb4yb3B/vx/28I5bUotiNCdJgGySLgG18as4"
)
# The hashes that verify: Argon2id as argon2-cffi writes it, or Werkzeug's scrypt or pbkdf2.
USABLE_HASH = re.compile(
    r"\$argon2id\$v=19\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+"
    r"|(scrypt:\d+:\d+:\d+|pbkdf2:sha(1|224|256|384|512):\d+)\$[A-Za-z0-9]+\$[0-9a-f]+"
)
# RFC 5321 §4.5.3.1.3: a path is at most 256 octets, so an address at most 254 characters.
MAX_EMAIL_LENGTH = 254
# NIST SP 800-63B-4 §3.1.1.2: a password that is the only factor has at least 15 characters.
MIN_PASSWORD_LENGTH = 15
# OWASP Authentication Cheat Sheet: allow long passphrases, but not input without bound.
MAX_PASSWORD_LENGTH = 1024
# The most common passwords, from a published list (its header names the source).
COMMON_PASSWORDS_FILE = Path(__file__).with_name("common-passwords.txt")
# Seconds a login waits for a hashing slot before it is told to come back.
SLOT_WAIT = 2
# The largest USERS_FILE read: a hundred thousand accounts, with room to spare.
MAX_USERS_FILE = 64 * 2**20
# Seconds between two looks at USERS_FILE's modification time, in each process.
RELOAD_INTERVAL = 1.0
T = TypeVar("T")


def normalised(password: str) -> str:
    """Return a password as it is hashed: NFKC, so each way of typing a character is one."""
    # NIST SP 800-63B-4 §3.1.1.2: apply NFKC normalisation before hashing.
    return unicodedata.normalize("NFKC", password)


def hash_password(password: str) -> str:
    """Return the Argon2id hash of a password, normalised, with a random salt of its own."""
    return PASSWORD_HASHER.hash(normalised(password))


def decoy_hash() -> str:
    """Return DECOY_HASH, or where PASSWORD_HASHER's parameters are others, a decoy of theirs."""
    if _needs_rehash(DECOY_HASH):
        return hash_password(secrets.token_urlsafe(16))
    return DECOY_HASH


def in_memory_hash(password: str) -> str:
    """Return the hash of an in-memory account's password: DEMO_HASH for the demo's public
    password at PASSWORD_HASHER's parameters, else a new one with a salt of its own."""
    if password == DEMO_PASSWORD and not _needs_rehash(DEMO_HASH):
        return DEMO_HASH
    return hash_password(password)


def password_problem(password: str, email: str) -> str | None:
    """Say why a password may not be set for this email, or return None.

    NIST SP 800-63B-4 §3.1.1.2 and ASVS 5.0 V6.2: any characters, each code point one; no
    composition rules; at least 15, at most 1024; not the email, not a common password.
    """
    typed = normalised(password)
    if len(typed) < MIN_PASSWORD_LENGTH:
        return (
            f"it has {len(typed)} characters and needs at least {MIN_PASSWORD_LENGTH}; "
            "a few words with spaces make one easy to remember"
        )
    if len(password) > MAX_PASSWORD_LENGTH or len(typed) > MAX_PASSWORD_LENGTH:
        return f"it is longer than {MAX_PASSWORD_LENGTH} characters"
    folded = typed.casefold()
    if _visible(folded) == _visible(normalised(email).casefold()):
        return "it is the account's email, the first thing anyone would try"
    if _common(folded):
        return "it is one of the most common passwords, which attackers try first"
    return None


def _visible(text: str) -> str:
    """Return the text without spaces and invisible format characters (zero-width ones)."""
    return "".join(c for c in text if not c.isspace() and unicodedata.category(c) != "Cf")


def _common(folded: str) -> bool:
    """Tell whether a casefolded password is a common one, or one repeated ("abc123abc123...")."""
    common = _common_passwords()
    for size in range(1, len(folded) // 2 + 1):
        times, unit = len(folded) // size, folded[:size]
        if len(folded) % size == 0 and folded == unit * times:
            # The shortest unit repeated: any run of it may be the listed one ("111111").
            return any(unit * run in common for run in range(1, times + 1))
    return folded in common


@functools.cache
def _common_passwords() -> frozenset[str]:
    """Return the casefolded entries of COMMON_PASSWORDS_FILE, read once per process."""
    lines = COMMON_PASSWORDS_FILE.read_text(encoding="utf-8").splitlines()
    return frozenset(normalised(line).casefold() for line in lines if not line.startswith("#"))


@dataclass(frozen=True)
class User:
    id: str
    email: str  # lower-cased
    password_hash: str


@dataclass(frozen=True)
class Accounts:
    """One consistent view of the accounts: replaced whole, never changed in place."""

    by_email: dict[str, User] = field(default_factory=dict)
    by_id: dict[str, User] = field(default_factory=dict)
    in_file: frozenset[str] = frozenset()  # ids of the accounts that have a line in USERS_FILE
    stamp: tuple[int, ...] | None = None  # USERS_FILE as read: (device, inode, mtime, ctime, size)


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


class PasswordChangedMeanwhile(Exception):
    """The account's hash in USERS_FILE is not the one the current password was checked on."""


class PasswordNotChangeable(Exception):
    """The account has no line in USERS_FILE to write a password on (the demo's, say)."""


class Users:
    """The accounts that may log in: those of USERS_FILE, and any added in memory (the demo).

    ``ended(user_id)`` is called for each account that a re-read of the file finds removed, or
    with a password changed by another process: the sessions a process holds in its own memory
    end with them, since the command that changed the file cannot reach them.
    """

    def __init__(
        self,
        path: str | None,
        log: logging.Logger,
        max_concurrent: int = 2,
        ended: Callable[[str, bool], object] | None = None,
    ) -> None:
        self.hashing = HashingSlots(max_concurrent)  # MAX_CONCURRENT_LOGINS
        self.ended = ended
        self._path = path
        self._log = log
        self._accounts = Accounts()
        self._in_memory: dict[str, User] = {}  # by email: the demo's, never in the file
        self._lock = threading.Lock()  # one writer of _accounts at a time
        self._looked_at = -math.inf  # when this process last looked at the file
        self._failed: tuple[tuple[int, ...] | None, str] | None = None  # (stamp, error) logged
        # OWASP Authentication Cheat Sheet: an unknown email costs the same hashing work as a
        # wrong password, so the timing does not tell which emails have accounts.
        self._decoy_hash = decoy_hash()

    @classmethod
    def load(
        cls,
        path: str | None,
        required: bool,
        log: logging.Logger,
        max_concurrent: int = 2,
        ended: Callable[[str, bool], object] | None = None,
        quiet: bool = False,
    ) -> "Users":
        """Read the accounts of USERS_FILE; without it, fail if ``required``, else warn (unless
        ``quiet``: a `users` command, about to create it)."""
        users = cls(path, log, max_concurrent, ended)
        if path is None:
            if required:
                raise ConfigError("USERS_FILE is not set, and the accounts must come from it.")
            return users
        users._looked_at = time.time()
        stamp, lines = _read_file(path)
        if lines is None:
            if required:
                raise ConfigError(
                    f"USERS_FILE {path} does not exist: `flask --app server users add EMAIL` "
                    "creates it."
                )
            if not quiet:
                log.warning("USERS_FILE %s does not exist yet: it is read once it does.", path)
            return users
        users._accounts = users._with_memory(_accounts(path, lines), stamp)
        return users

    def fresh(self, look_now: bool = False) -> Accounts:
        """Return the accounts, read again if USERS_FILE changed since the last look.

        One thread a second looks (one stat); the others meanwhile go on with what is there.
        ``look_now`` looks at once, after any look or write under way (still_holds).
        """
        if self._path is None or not (look_now or self._look_due()):
            return self._accounts
        if not self._lock.acquire(blocking=look_now):
            return self._accounts  # another thread is looking, or writing
        try:
            if look_now or self._look_due():
                self._looked_at = time.time()
                self._reread(self._path)
        finally:
            self._lock.release()
        return self._accounts

    def _look_due(self) -> bool:
        # The wall clock, which tests move; abs(), so a clock set back does not stop the looks.
        return abs(time.time() - self._looked_at) >= RELOAD_INTERVAL

    def _reread(self, path: str) -> None:
        """Read the file again if it changed; keep the last good accounts if it is not usable."""
        stamp: tuple[int, ...] | None = None
        try:
            stamp = _stamp(path)
            if stamp == self._accounts.stamp or self._failed and stamp == self._failed[0]:
                return
            stamp, lines = _read_file(path)
            if lines is None:
                raise ConfigError(f"USERS_FILE {path} no longer exists.")
            found = _accounts(path, lines)
        except ConfigError as error:
            if (stamp, error.message) != self._failed:  # one line per change, not per request
                self._log.error(
                    "%s Until it is fixed, the %d accounts read before stay.",
                    error.message,
                    len(self._accounts.in_file),
                )
            self._failed = (stamp, error.message)
            return
        before, self._failed = self._accounts, None
        after = self._accounts = self._with_memory(found, stamp)
        self._log.info("USERS_FILE %s changed: %d accounts now.", path, len(after.in_file))
        for user in before.by_id.values():
            if self.ended is None or user.id not in before.in_file:
                continue
            if user.id not in after.in_file:
                self.ended(user.id, True)  # removed, by a command or by hand
            elif after.by_id[user.id].password_hash != user.password_hash:
                self.ended(user.id, False)  # its password changed by another process

    def _with_memory(
        self, found: dict[str, tuple[int, str, str]], stamp: tuple[int, ...] | None
    ) -> Accounts:
        """Return the accounts of the file as read, with the in-memory ones beside them."""
        file_users = [User(_user_id(email), email.lower(), h) for _, email, h in found.values()]
        everyone = file_users + list(self._in_memory.values())
        return Accounts(
            by_email={user.email: user for user in everyone},
            by_id={user.id: user for user in everyone},
            in_file=frozenset(user.id for user in file_users),
            stamp=stamp,
        )

    def add(self, email: str, password: str) -> User:
        """Add an account in memory only (the demo's); ValueError if the email has one."""
        user = User(_user_id(email), email.lower(), in_memory_hash(password))
        with self._lock:
            if user.email in self._accounts.by_email:
                raise ValueError(f"{email} already has an account.")
            self._in_memory[user.email] = user
            self._replace(user)
        return user

    def authenticate(self, email: str, password: str) -> User | None:
        """Return the user these credentials belong to, or None; checked on a hashing slot."""
        return self.hashing.run(lambda: self._check(email, password))

    def still_holds(self, user: User, password: str) -> bool:
        """Tell whether ``password``, which verified on ``user``, is still the account's as
        USERS_FILE says now (one stat; read again only if it changed).

        A login asks once its session is started. Another worker, or the command, may have
        changed the password since this process last looked (once a second): the session of
        the old password then ends at once, rather than outlive the change that was to end it.
        """
        if self._path is None or user.email in self._in_memory:
            return True  # in memory only (the demo's): it never changes
        now = self.fresh(look_now=True).by_id.get(user.id)
        if now is None:
            return False  # removed meanwhile
        if now.password_hash == user.password_hash:
            return True
        return self.hashing.run(lambda: _verified_form(now.password_hash, password)) is not None

    def _check(self, email: str, password: str) -> User | None:
        user = self.fresh().by_email.get(email.lower())
        if user is None:
            _verified_form(self._decoy_hash, password)  # the same work as for a known email
            return None
        form = _verified_form(user.password_hash, password)
        if form is None:
            return None
        if form != normalised(password) or _needs_rehash(user.password_hash):
            return self._rehash(user, password)
        return user

    def in_file(self, user: User) -> bool:
        """Tell whether the account has a line in USERS_FILE, where its password can change."""
        return user.id in self.fresh().in_file

    def change_password(
        self, user: User, current: str, password: str, before_writing: Callable[[], T]
    ) -> T:
        """Write a new hash on the account's line, calling ``before_writing`` (which ends the
        other sessions) just before; return what it returned. ``user`` is the account as the
        ``current`` password was checked on.

        PasswordNotChangeable if the account has no line; an OSError if the file cannot be
        written. Ending the sessions first fails closed: if it raises (the store is down),
        nothing is written, and the file is the last thing that can fail.
        """
        if self._path is None or not self.in_file(user):
            raise PasswordNotChangeable("This account is not one of USERS_FILE's.")
        changed = replace(user, password_hash=self.hashing.run(lambda: hash_password(password)))
        with self._lock, editing(self._path) as lines:
            if not lines:
                raise ConfigError(f"USERS_FILE {self._path} no longer exists.")
            index = _line_of(lines, user.email)
            if index is None:
                raise PasswordNotChangeable("This account is no longer in USERS_FILE.")
            # Only over a hash of the current password: a change made meanwhile (by another
            # request, worker or command) is never overwritten. Another worker may have
            # upgraded the hash of the same password: that one verifies it too.
            on_file = _hash_on(lines[index])
            if on_file != user.password_hash and _verified_form(on_file, current) is None:
                raise PasswordChangedMeanwhile("The password was changed meanwhile.")
            lines[index] = _with_hash(lines[index], changed.password_hash)
            result = before_writing()
        with self._lock:
            self._replace(changed)  # this process knows at once; the others within a second
        return result

    def __len__(self) -> int:
        """Count the accounts."""
        return len(self._accounts.by_id)

    def get(self, user_id: str) -> User | None:
        """Return the user with this id, or None (as USERS_FILE says, within a second)."""
        return self.fresh().by_id.get(user_id)

    def _replace(self, user: User) -> None:
        """Put a user in place of the one of the same id; the caller holds the lock."""
        accounts = self._accounts
        self._accounts = replace(
            accounts,
            by_email=accounts.by_email | {user.email: user},
            by_id=accounts.by_id | {user.id: user},
        )

    def _rehash(self, user: User, password: str) -> User:
        """Replace an older hash of a password that just verified by an Argon2id one."""
        # OWASP Password Storage Cheat Sheet: upgrade a legacy hash at the next successful login.
        upgraded = replace(user, password_hash=hash_password(password))
        with self._lock:
            if self._accounts.by_id.get(user.id) is not user:  # changed meanwhile
                return self._accounts.by_id.get(user.id) or upgraded
            self._replace(upgraded)
            self._log.info("Upgraded the password hash of account %s to Argon2id.", user.id)
            if user.id in self._accounts.in_file:
                self._rewrite_line(user, upgraded.password_hash)
        return upgraded

    def _rewrite_line(self, user: User, new_hash: str) -> None:
        """Put the new hash on the account's line; if that fails, it stays in memory only."""
        assert self._path is not None  # only accounts of the file are rewritten
        try:
            with editing(self._path) as lines:
                if _replace_hash(lines, user.email, new_hash, user.password_hash):
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


def _verified_form(password_hash: str, password: str) -> str | None:
    """Return the form of the password that matches the hash: NFKC, or else as typed (a hash
    made before passwords were normalised); None if neither does."""
    forms = dict.fromkeys([normalised(password), password])  # one form when they are the same
    return next((form for form in forms if _verify(password_hash, form)), None)


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


def _stamp(path: str) -> tuple[int, ...] | None:
    """Return what tells one version of the file from another, or None if there is none."""
    try:
        return _stamp_of(os.stat(path))
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ConfigError(f"USERS_FILE {path} cannot be read: {error.strerror}.") from None


def _stamp_of(status: os.stat_result) -> tuple[int, ...]:
    # A rename brings a new inode, but inode numbers are reused: the times and size too.
    return (status.st_dev, status.st_ino, status.st_mtime_ns, status.st_ctime_ns, status.st_size)


def _read_file(path: str) -> tuple[tuple[int, ...] | None, list[str] | None]:
    """Return the stamp and lines of the file as read (one open file: they agree), or Nones.

    Only a regular file of at most MAX_USERS_FILE bytes is read: a FIFO, a device or a folder
    put in its place is refused at once, never waited on or read without end.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO's open never waits
    except FileNotFoundError:
        return None, None
    except OSError as error:
        raise ConfigError(f"USERS_FILE {path} cannot be read: {error.strerror}.") from None
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode):
        os.close(descriptor)
        raise ConfigError(f"USERS_FILE {path} is not a regular file.")
    with open(descriptor, "rb") as file:
        data = file.read(MAX_USERS_FILE + 1)
    if len(data) > MAX_USERS_FILE:
        raise ConfigError(f"USERS_FILE {path} is over {MAX_USERS_FILE // 2**20} MiB.")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark, as some editors write, is no line
    except UnicodeDecodeError:
        raise ConfigError(f"USERS_FILE {path} is not UTF-8 text.") from None
    return _stamp_of(status), text.splitlines(keepends=True)


def _file_lines(path: str) -> list[str] | None:
    """Return the lines of USERS_FILE with their endings, or None if there is no such file."""
    return _read_file(path)[1]


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


def _line_of(lines: list[str], email: str) -> int | None:
    """Return the index of the line of ``email``, or None."""
    for index, line in enumerate(lines):
        if line.strip().partition(":")[0].lower() == email.lower():
            return index
    return None


def _hash_on(line: str) -> str:
    """Return the password hash a line of USERS_FILE holds."""
    return line.strip().partition(":")[2]


def _with_hash(line: str, new_hash: str) -> str:
    """Return the line with ``new_hash`` in place of its hash, and the same line ending."""
    ending = line[len(line.rstrip("\r\n")) :]
    return f"{line.strip().partition(':')[0]}:{new_hash}{ending}"


def _replace_hash(lines: list[str], email: str, new_hash: str, old_hash: str = "") -> bool:
    """Put a new hash on the line of ``email`` (only if it holds ``old_hash``, when given)."""
    index = _line_of(lines, email)
    if index is None or old_hash not in ("", _hash_on(lines[index])):
        return False
    lines[index] = _with_hash(lines[index], new_hash)
    return True


@contextlib.contextmanager
def editing(path: str) -> Iterator[list[str]]:
    """Yield the lines of USERS_FILE to change, under its lock; then write them at once.

    The lock is a file of its own beside it (``USERS_FILE.lock``, fcntl.flock): a lock on the
    accounts file itself would be lost with the inode that each rename replaces. Two changes at
    once, from two commands or two servers, are made one after the other and both kept.
    """
    path = os.path.realpath(path)
    descriptor = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        _check_writable(path)  # before the caller acts on a change that could not be written
        before = _file_lines(path)
        # A file the servers cannot read is fixed by hand first: a change written into it
        # would reach no server (ConfigError names the line).
        _accounts(path, before or [])
        lines = list(before or [])
        yield lines
        if lines != (before or []):
            _write_lines(path, lines)
    finally:
        os.close(descriptor)  # which releases the lock


def _mode(path: str) -> int:
    """Return the file's permissions, or those a new one gets."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o600  # CWE-732: a file of password hashes is readable by its owner only


def _check_writable(path: str) -> None:
    """Raise PermissionError for a file made read-only: it stays as it is, even for root."""
    if not _mode(path) & stat.S_IWUSR:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)


def _write_lines(path: str, lines: list[str]) -> None:
    """Replace the file's content at once (a reader sees the old or the new), keeping its mode."""
    mode = _mode(path)
    _check_writable(path)
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


users_cli = AppGroup("users", help="Add, list, change and remove the accounts of USERS_FILE.")


@users_cli.command("add")
@click.argument("email")
def add_user(email: str) -> None:
    """Add an account to USERS_FILE, asking for its password twice."""
    path = _users_file()
    problem = _email_problem(email)
    if problem:
        raise click.ClickException(f"Cannot add this email: {problem}.")
    _refuse_unless(email, path, has_account=False)
    password_hash = hash_password(_ask_password(f"Password for {email}", email))
    with _editing_cli(path) as lines:
        if email.lower() in _accounts(path, lines):  # added by another command meanwhile
            raise click.ClickException(f"{email} already has an account in {path}.")
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(f"{email}:{password_hash}\n")
    click.echo(f"Added {email} to {path}. {RUNNING_SERVERS} log it in within a second.")


@users_cli.command("list")
def list_users() -> None:
    """Print the email of every account in USERS_FILE, one a line."""
    path = _users_file()
    lines = _file_lines(path)
    if lines is None:
        raise click.ClickException(f"USERS_FILE {path} does not exist; `users add` creates it.")
    for _, email, _ in _accounts(path, lines).values():
        click.echo(email)


@users_cli.command("passwd")
@click.argument("email")
def change_password(email: str) -> None:
    """Replace the password of EMAIL's account, asking twice; every session of it ends."""
    path = _users_file()
    _refuse_unless(email, path, has_account=True)
    password_hash = hash_password(_ask_password(f"New password for {email}", email))
    with _editing_cli(path) as lines:
        if not _replace_hash(lines, email, password_hash):
            raise click.ClickException(f"{path} has no account for {email}.")
        # OWASP Session Management Cheat Sheet, ASVS 5.0 V7: a new password ends every session.
        ended = _end_sessions(email)
    _end_sessions_again(email)
    click.echo(f"Changed the password of {email} in {path}. {ended}")


@users_cli.command("remove")
@click.argument("email")
def remove_user(email: str) -> None:
    """Remove the account of EMAIL from USERS_FILE; every session of it ends."""
    path = _users_file()
    with _editing_cli(path) as lines:
        account = _accounts(path, lines).get(email.lower())
        if account is None:
            raise click.ClickException(f"{path} has no account for {email}.")
        del lines[account[0] - 1]
        ended = _end_sessions(email)  # OWASP ASVS 3.3.3: the account's sessions end with it
    _end_sessions_again(email)
    click.echo(f"Removed {email} from {path}. {ended}")


RUNNING_SERVERS = "Running servers that read it"


def _end_sessions(email: str) -> str:
    """End the account's sessions where this command can reach them; say what happens to all.

    Called before the file is written: if the store does not answer, nothing changes.
    """
    store = get_store()
    if store.kind == "memory":
        # This command's memory is not a server's: each server ends them itself on reading.
        return f"{RUNNING_SERVERS} end its sessions within a second."
    try:
        count = len(store.end_all(_user_id(email)))
    except store.unavailable as error:
        message = f"The session store does not answer ({type(error).__name__}); nothing changed."
        raise click.ClickException(message) from None
    sessions = f"{count} session{'s' * (count != 1)}"
    return f"Ended its {sessions} in the shared store; its tokens stop working now."


def _end_sessions_again(email: str) -> None:
    """Once the file is written, end what a login started meanwhile on a server that looked at
    the file just before (Users.still_holds catches every later one)."""
    store = get_store()
    if store.kind == "memory":
        return
    try:
        store.end_all(_user_id(email))
    except store.unavailable as error:
        message = f"The session store stopped answering ({type(error).__name__}) after the "
        click.echo(message + "change: a login made in that moment may keep its session.", err=True)


def _refuse_unless(email: str, path: str, has_account: bool) -> None:
    """Stop before asking for a password that could not be used."""
    present = email.lower() in _accounts(path, _file_lines(path) or [])
    if present and not has_account:
        raise click.ClickException(f"{email} already has an account in {path}.")
    if has_account and not present:
        raise click.ClickException(f"{path} has no account for {email}.")


@contextlib.contextmanager
def _editing_cli(path: str) -> Iterator[list[str]]:
    """``editing``, saying in one line why the file cannot be written."""
    try:
        with editing(path) as lines:
            yield lines
    except OSError as error:
        message = f"USERS_FILE {path} cannot be written: {error.strerror}."
        raise click.ClickException(message) from None


def _ask_password(prompt: str, email: str) -> str:
    """Ask for a password twice, without echo, until one can be set."""
    return click.prompt(
        prompt,
        hide_input=True,
        confirmation_prompt=True,
        default="",  # so that an empty password reaches the check, which says what is wrong
        show_default=False,
        value_proc=lambda password: _checked_password(password, email),
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


def _checked_password(password: str, email: str) -> str:
    """Return the password typed at the prompt; BadParameter makes click ask again."""
    if not password:
        raise click.BadParameter("The password is empty.")
    problem = password_problem(password, email)
    if problem:
        raise click.BadParameter(f"The password cannot be used: {problem}.")
    return password


def init_app(app: Flask) -> None:
    """Read the accounts of USERS_FILE, add the demo account where the settings say, and add
    the ``flask users`` commands."""
    config = app.config
    # The `flask users` commands must run before the file exists: they create it.
    from_cli = app_command() and not config["SERVER"]
    path = config["USERS_FILE"]
    production = config["APP_ENV"] == "production"
    required = production and path is not None and not from_cli
    users = Users.load(
        path,
        required,
        app.logger,
        config["MAX_CONCURRENT_LOGINS"],
        ended=None if from_cli else _ending_sessions(app),
        quiet=from_cli,
    )
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


def _ending_sessions(app: Flask) -> Callable[[str, bool], object]:
    """Return what ends an account's sessions when a re-read of USERS_FILE finds it removed,
    or (in this process's memory) its password changed."""
    store = app.extensions["store"]

    def end(user_id: str, removed: bool) -> None:
        if store.kind != "memory" and not removed:
            # A shared store was told by whatever changed the password (the command, POST
            # /password); ending them here again would end the session that changed it.
            return
        try:
            ended = store.end_all(user_id)
        except store.unavailable:  # each worker tries; the account check refuses them anyway
            return
        app.logger.info(
            "Account %s was removed or its password changed: its %d sessions here ended.",
            user_id,
            len(ended),
        )

    return end


def get_users() -> Users:
    """Return the app's accounts."""
    return current_app.extensions["users"]
