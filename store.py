"""Where sessions live.

A login starts a *session*. The store keeps, per session, the id (``jti``) of the one refresh
token that may be used next and the one it replaced, until when the session lives (absolute
and idle deadlines), and what the user may see of it (when, from where, with which browser).
Every access token names its session (``sid``), so one lookup tells whether it still counts.
Tokens themselves are never stored: their ids are enough.

``MemoryStore`` serves one process (the default); ``RedisStore`` (``redis_store.py``) is
shared by every worker and machine that points at the same Redis. Both take the time (``now``,
Unix seconds) from the caller, so tests control the clock and every process judges deadlines
alike.
"""

import dataclasses
import enum
import operator
import secrets
import threading
from dataclasses import dataclass
from typing import Protocol

from flask import Flask, current_app

from errors import store_unavailable


def new_id() -> str:
    """Return a fresh random id of 128 bits from a CSPRNG (22 base64url characters)."""
    return secrets.token_urlsafe(16)


@dataclass(slots=True)  # no per-instance __dict__: a million sessions, a hundred MB less
class Session:
    """One login: its current refresh token, its deadlines and what the user may see."""

    id: str
    user_id: str
    jti: str  # the current refresh token's id
    created_at: int
    # The last login or rotation: the current refresh token's iat (so it can be minted again
    # identically), and when the previous one was spent.
    last_used_at: int
    expires_at: int  # absolute: rotation never moves it (OWASP ASVS 3.3.1)
    idle_expires_at: int | None  # None when the idle timeout is off
    user_agent: str
    ip: str
    previous_jti: str = ""  # the token the last rotation spent: a retry within grace is no theft

    @property
    def deadline(self) -> int:
        """When the session ends unless used: the idle deadline, never after the absolute."""
        return self.idle_expires_at or self.expires_at  # Policy caps idle at expires_at

    def live(self, now: int) -> bool:
        """Tell whether neither deadline has passed."""
        return now < self.deadline

    def copy(self) -> "Session":
        """Return a copy: what dataclasses.replace(self) returns, in a third of its time."""
        return Session(*_values(self))


_values = operator.attrgetter(*(field.name for field in dataclasses.fields(Session)))


@dataclass(frozen=True)
class Policy:
    """The rules every store applies to sessions (settings of the same names)."""

    idle_ttl: int = 604_800  # SESSION_IDLE_TTL (OWASP ASVS 3.3.2); 0 turns the timeout off
    max_sessions: int = 20  # MAX_SESSIONS_PER_USER
    grace: int = 10  # REFRESH_REUSE_GRACE; 0 makes every second use reuse
    lifetime: int = 1_209_600  # REFRESH_TOKEN_TTL: how long a session lives from its login

    def new_session(self, user_id: str, now: int, user_agent: str, ip: str) -> Session:
        """Return a session that starts at ``now``, with its first refresh token's id."""
        expires_at = now + self.lifetime
        return Session(
            new_id(), user_id, new_id(), now, now, expires_at,
            self.idle_deadline(now, expires_at), user_agent, ip,
        )  # fmt: skip

    def accepts(self, session: Session, jti: str, now: int) -> bool:
        """Tell whether a refresh token is the session's current one, or just spent and forgiven.

        A grace window relaxes RFC 9700 §4.14.2's rotation as Auth0, Ory Hydra and Supabase
        do: the token just spent, retried within ``grace`` seconds (two tabs, a lost answer),
        still counts. The Lua of ROTATE_SCRIPT in redis_store.py is this rule's twin.
        """
        if jti == session.jti:
            return True
        spent_at = session.last_used_at  # the rotation that spent previous_jti
        return jti == session.previous_jti and self.grace > 0 and now - spent_at <= self.grace

    def idle_deadline(self, now: int, expires_at: int) -> int | None:
        """Return when a session used at ``now`` goes idle: never after its absolute end."""
        return min(now + self.idle_ttl, expires_at) if self.idle_ttl else None


class Rotation(enum.Enum):
    """What became of a refresh token presented for rotation."""

    ROTATED = "rotated"  # it was the session's current token; the new one replaces it
    FORGIVEN_RETRY = "replayed"  # the one just spent, within the grace window: no change
    REUSE_ENDED_SESSION = "reused"  # it was spent before: a thief or a victim, the session ends
    UNKNOWN = "unknown"  # no live session: ended, expired or idle


class Store(Protocol):
    """The interface every backend implements; every change to a session is atomic."""

    kind: str  # "memory" or "redis", for GET /healthz
    # What it raises when it does not answer: store.init_app makes each a 503 (fail closed).
    unavailable: tuple[type[Exception], ...]

    def start(self, session: Session, now: int) -> list[str]:
        """Add a session; end the user's least recently used beyond the cap; return their ids."""

    def rotate(
        self, sid: str, jti: str, *, new_jti: str, user: str, now: int, ip: str
    ) -> tuple[Rotation, Session | None]:
        """Replace ``jti`` by ``new_jti`` if ``jti`` is current; return the outcome and session."""

    def get(self, sid: str, user: str, now: int) -> Session | None:
        """Return the user's live session ``sid``, or None.

        Every token names its user (``sub``), so a store may keep a user's sessions together
        (one slot of a Redis Cluster) and need the user to find one.
        """

    def sessions(self, user: str, now: int) -> list[Session]:
        """Return the user's live sessions, most recently used first."""

    def end(self, sid: str, user: str, now: int) -> bool:
        """End the user's live session ``sid``; tell whether there was one to end."""

    def end_all(self, user: str, keep: str | None = None) -> list[str]:
        """End every session of the user but ``keep``; return the ids ended."""

    def ping(self) -> None:
        """Return if the store answers; raise if it does not."""


class MemoryStore(Store):
    """The store of one process: dictionaries behind one lock.

    Lookups are by key, so their cost does not grow with the number of sessions. Ended
    sessions are ignored when read and swept out once the dictionary has doubled since the
    last sweep, so memory follows the live sessions, not every login since start.
    """

    kind = "memory"
    unavailable = ()  # it always answers

    def __init__(self, policy: Policy = Policy()) -> None:
        self._policy = policy
        self._lock = threading.Lock()  # the threaded server runs views concurrently
        self._sessions: dict[str, Session] = {}
        # user -> ids of their sessions, least recently used first: a short list (the cap
        # bounds it), smaller than a set
        self._by_user: dict[str, list[str]] = {}
        self._swept_at_size = 0

    def start(self, session: Session, now: int) -> list[str]:
        with self._lock:
            for dead in [s for s in self._of_user(session.user_id) if not s.live(now)]:
                self._drop(dead.id)
            mine = self._by_user.get(session.user_id, [])
            evicted = []
            # A cap per user bounds the memory one account can take (OWASP Session Mgmt).
            while len(mine) >= self._policy.max_sessions:
                evicted.append(mine[0])
                self._drop(mine[0])
            self._sessions[session.id] = session.copy()  # ours, not the caller's
            self._by_user.setdefault(session.user_id, []).append(session.id)
            self._sweep(now)
            return evicted

    def rotate(
        self, sid: str, jti: str, *, new_jti: str, user: str, now: int, ip: str
    ) -> tuple[Rotation, Session | None]:
        with self._lock:
            session = self._sessions.get(sid)
            if session is None or not session.live(now):
                self._drop(sid)
                return Rotation.UNKNOWN, None
            if session.user_id != user:  # not this user's: refuse, end nothing
                return Rotation.UNKNOWN, None
            if not self._policy.accepts(session, jti, now):
                self._drop(sid)
                return Rotation.REUSE_ENDED_SESSION, None
            if jti != session.jti:
                return Rotation.FORGIVEN_RETRY, session.copy()
            session.previous_jti, session.jti, session.last_used_at, session.ip = (
                jti, new_jti, now, ip,
            )  # fmt: skip
            session.idle_expires_at = self._policy.idle_deadline(now, session.expires_at)
            mine = self._by_user[user]
            mine.append(mine.pop(mine.index(sid)))  # now the most recently used
            return Rotation.ROTATED, session.copy()

    def get(self, sid: str, user: str, now: int) -> Session | None:
        with self._lock:
            session = self._sessions.get(sid)
            if session is None or session.user_id != user or not session.live(now):
                return None
            return session.copy()

    def sessions(self, user: str, now: int) -> list[Session]:
        with self._lock:
            recent_first = reversed(self._of_user(user))
            return [s.copy() for s in recent_first if s.live(now)]

    def end(self, sid: str, user: str, now: int) -> bool:
        with self._lock:
            session = self._sessions.get(sid)
            if session is None or session.user_id != user:
                return False
            self._drop(sid)
            return session.live(now)

    def end_all(self, user: str, keep: str | None = None) -> list[str]:
        with self._lock:
            ended = [s.id for s in self._of_user(user) if s.id != keep]
            for sid in ended:
                self._drop(sid)
            return ended

    def ping(self) -> None:
        pass  # memory always answers

    def __len__(self) -> int:
        """Count the sessions held, live or not yet swept (for tests and benchmarks)."""
        with self._lock:
            return len(self._sessions)

    def _of_user(self, user: str) -> list[Session]:
        return [self._sessions[sid] for sid in self._by_user.get(user, [])]

    def _drop(self, sid: str) -> None:
        session = self._sessions.pop(sid, None)
        if session is None:
            return
        mine = self._by_user[session.user_id]
        mine.remove(sid)
        if not mine:
            del self._by_user[session.user_id]

    def _sweep(self, now: int) -> None:
        # One full pass each time the size doubles keeps the cost per login constant.
        if len(self._sessions) < max(1024, 2 * self._swept_at_size):
            return
        for sid in [sid for sid, s in self._sessions.items() if not s.live(now)]:
            self._drop(sid)
        self._swept_at_size = len(self._sessions)


def init_app(app: Flask) -> None:
    """Give the app its session policy and its store: a MemoryStore, or where REDIS_URL is set,
    the RedisStore of redis_store.py."""
    config = app.config
    policy = app.extensions["policy"] = Policy(
        idle_ttl=config["SESSION_IDLE_TTL"],
        max_sessions=config["MAX_SESSIONS_PER_USER"],
        grace=config["REFRESH_REUSE_GRACE"],
        lifetime=config["REFRESH_TOKEN_TTL"],
    )
    if config["REDIS_URL"]:
        import redis_store  # only here: a process without Redis never loads redis-py

        redis_store.init_app(app)
    else:
        app.extensions["store"] = MemoryStore(policy)
        if config["SERVER"]:
            app.logger.warning(
                "Running under %s with the in-memory store: with more than one worker, each "
                "worker has its own sessions. Set REDIS_URL.",
                config["SERVER"],
            )
    # Fail closed: without the store's word no token is issued or accepted, a 503 instead.
    for failure in app.extensions["store"].unavailable:
        app.register_error_handler(failure, store_unavailable)


def get_store() -> Store:
    """Return the app's store of sessions."""
    return current_app.extensions["store"]


def get_policy() -> Policy:
    """Return the rules the app's sessions follow."""
    return current_app.extensions["policy"]
