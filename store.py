"""Where refresh-token sessions live.

A login starts a *family*: the chain of refresh tokens that one session rotates through.
The store keeps, per family, the one refresh token (by its ``jti``) that may be used next,
and until when the family lives. It also keeps the deny list of access tokens revoked at
logout. Tokens themselves are never stored: their ids are enough.

``MemoryStore`` serves one process (the default); ``RedisStore`` is shared by every worker
and machine that points at the same Redis.
"""

import enum
import threading
import time
from collections.abc import Callable
from typing import Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


class Rotation(enum.Enum):
    """What became of a refresh token presented for rotation."""

    ROTATED = "rotated"  # it was the family's current token; the new one replaces it
    REUSED = "reused"  # it was already rotated away; the family is now revoked
    UNKNOWN = "unknown"  # no live family: logged out, revoked or expired


class Store(Protocol):
    """The interface every backend implements; times are Unix seconds."""

    kind: str  # "memory" or "redis", for GET /healthz

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

    def ping(self) -> None:
        """Return if the store answers; raise if it does not."""


class MemoryStore:
    """The store of one process: dictionaries behind a lock, each entry with its expiry.

    Lookups are by key, so their cost does not grow with the number of sessions. Expired
    entries are ignored when read and swept out once the dictionary has doubled since the
    last sweep, so memory follows the live sessions, not every login since start.
    """

    kind = "memory"

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

    def ping(self) -> None:
        pass  # memory always answers

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


# Fail fast when Redis is down: one immediate retry (for a connection Redis dropped while
# idle), then the error, within seconds, so the client gets its 503 promptly.
REDIS_OPTIONS = {"socket_timeout": 2, "socket_connect_timeout": 2, "retry": Retry(NoBackoff(), 1)}


# Rotation must compare and replace in one step, or two processes could both see the old
# token as current and both win. Redis runs a Lua script atomically (no other command runs
# in between), which is simpler than WATCH/MULTI/EXEC and costs one round trip, not three.
ROTATE_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
if current ~= ARGV[1] then
    redis.call('DEL', KEYS[1])
    return 1
end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 2
"""
ROTATION_BY_SCRIPT_RESULT = [Rotation.UNKNOWN, Rotation.REUSED, Rotation.ROTATED]


class RedisStore:
    """The store shared by every process: Redis keys that expire with their session.

    ``family:<id>`` holds the current refresh jti and ``denied:<jti>`` marks a revoked access
    token; both are set to expire at the token's own ``exp`` (EXAT), so Redis forgets them.
    Redis errors propagate: the app answers 503 rather than accept a token unchecked.
    """

    kind = "redis"

    def __init__(self, client: redis.Redis, prefix: str = "jwt:") -> None:
        self._redis = client
        self._prefix = prefix
        self._rotate = client.register_script(ROTATE_SCRIPT)

    def start(self, family: str, jti: str, expires_at: int) -> None:
        self._redis.set(self._family_key(family), jti, exat=expires_at)

    def rotate(self, family: str, jti: str, new_jti: str) -> Rotation:
        result = self._rotate(keys=[self._family_key(family)], args=[jti, new_jti])
        return ROTATION_BY_SCRIPT_RESULT[result]

    def revoke(self, family: str) -> None:
        self._redis.delete(self._family_key(family))

    def deny(self, jti: str, expires_at: int) -> None:
        self._redis.set(f"{self._prefix}denied:{jti}", 1, exat=expires_at)

    def is_denied(self, jti: str) -> bool:
        return bool(self._redis.exists(f"{self._prefix}denied:{jti}"))

    def ping(self) -> None:
        self._redis.ping()

    def _family_key(self, family: str) -> str:
        return f"{self._prefix}family:{family}"
