"""Where refresh-token sessions live.

A login starts a *family*: the chain of refresh tokens that one session rotates through.
The store keeps, per family, the one refresh token (by its ``jti``) that may be used next,
and until when the family lives. It also keeps the deny list of access tokens revoked at
logout. Tokens themselves are never stored: their ids are enough.
"""

import enum
import threading
import time
from collections.abc import Callable
from typing import Protocol


class Rotation(enum.Enum):
    """What became of a refresh token presented for rotation."""

    ROTATED = "rotated"  # it was the family's current token; the new one replaces it
    REUSED = "reused"  # it was already rotated away; the family is now revoked
    UNKNOWN = "unknown"  # no live family: logged out, revoked or expired


class Store(Protocol):
    """The interface every backend implements; times are Unix seconds."""

    def start(self, family: str, jti: str, expires_at: int) -> None:
        """Begin a family whose current refresh token is ``jti``."""

    def rotate(self, family: str, jti: str, new_jti: str) -> Rotation:
        """Atomically replace ``jti`` by ``new_jti`` if ``jti`` is the family's current token."""

    def revoke(self, family: str) -> None:
        """End a family; every refresh token of it stops working."""

    def deny(self, jti: str, expires_at: int) -> None:
        """Refuse the access token ``jti`` until it expires by itself."""

    def is_denied(self, jti: str) -> bool:
        """Tell whether the access token ``jti`` was revoked."""


class MemoryStore:
    """The store of one process: dictionaries behind a lock, each entry with its expiry.

    Lookups are by key, so their cost does not grow with the number of sessions. Expired
    entries are ignored when read and swept out once the dictionary has doubled since the
    last sweep, so memory follows the live sessions, not every login since start.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()  # the threaded server runs views concurrently
        self._families: dict[str, tuple[str, int]] = {}  # family -> (current jti, expires_at)
        self._denied: dict[str, int] = {}  # access jti -> expires_at
        self._swept_at_size = {"families": 0, "denied": 0}

    def start(self, family: str, jti: str, expires_at: int) -> None:
        with self._lock:
            self._families[family] = (jti, expires_at)
            self._sweep("families", self._families, lambda entry: entry[1])

    def rotate(self, family: str, jti: str, new_jti: str) -> Rotation:
        with self._lock:
            entry = self._families.get(family)
            if entry is None or entry[1] <= self._clock():
                return Rotation.UNKNOWN
            current, expires_at = entry
            if jti != current:
                del self._families[family]
                return Rotation.REUSED
            self._families[family] = (new_jti, expires_at)
            return Rotation.ROTATED

    def revoke(self, family: str) -> None:
        with self._lock:
            self._families.pop(family, None)

    def deny(self, jti: str, expires_at: int) -> None:
        with self._lock:
            self._denied[jti] = expires_at
            self._sweep("denied", self._denied, lambda expiry: expiry)

    def is_denied(self, jti: str) -> bool:
        with self._lock:
            return self._denied.get(jti, 0) > self._clock()

    def __len__(self) -> int:
        """Count the entries held, live or not yet swept (for tests and benchmarks)."""
        with self._lock:
            return len(self._families) + len(self._denied)

    def _sweep(self, name: str, entries: dict, expiry: Callable) -> None:
        # One full pass each time the size doubles keeps the cost per write constant.
        if len(entries) < max(1024, 2 * self._swept_at_size[name]):
            return
        now = self._clock()
        for key in [key for key, value in entries.items() if expiry(value) <= now]:
            del entries[key]
        self._swept_at_size[name] = len(entries)
