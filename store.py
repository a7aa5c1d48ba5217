"""Where sessions live.

A login starts a *session*. The store keeps, per session, the id (``jti``) of the one refresh
token that may be used next and the one it replaced, until when the session lives (absolute
and idle deadlines), and what the user may see of it (when, from where, with which browser).
Every access token names its session (``sid``), so one lookup tells whether it still counts.
Tokens themselves are never stored: their ids are enough.

``MemoryStore`` serves one process (the default); ``RedisStore`` is shared by every worker
and machine that points at the same Redis. Both take the time (``now``, Unix seconds) from
the caller, so tests control the clock and every process judges deadlines alike.
"""

import dataclasses
import enum
import secrets
import threading
from dataclasses import dataclass
from typing import Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def new_id() -> str:
    """Return a fresh random id of 128 bits from a CSPRNG (22 base64url characters)."""
    return secrets.token_urlsafe(16)


@dataclass(slots=True)  # no per-instance __dict__: a million sessions, a hundred MB less
class Session:
    """One login: its current refresh token, its deadlines and what the user may see."""

    id: str
    user: str
    jti: str  # the current refresh token's id
    issued_at: int  # the current refresh token's iat, so it can be minted again identically
    created_at: int
    last_used_at: int  # the last login or refresh
    expires_at: int  # absolute: rotation never moves it (OWASP ASVS 3.3.1)
    idle_expires_at: int | None  # None when the idle timeout is off
    user_agent: str
    ip: str
    previous_jti: str = ""  # the token the last rotation spent...
    rotated_at: int = 0  # ...and when: a retry within the grace window is no theft

    @property
    def deadline(self) -> int:
        """When the session ends unless used: the idle deadline, never after the absolute."""
        return self.idle_expires_at or self.expires_at  # Policy caps idle at expires_at

    def live(self, now: int) -> bool:
        """Tell whether neither deadline has passed."""
        return now < self.deadline


@dataclass(frozen=True)
class Policy:
    """The rules every store applies to sessions (settings of the same names)."""

    idle_ttl: int = 604_800  # SESSION_IDLE_TTL (OWASP ASVS 3.3.2); 0 turns the timeout off
    max_sessions: int = 20  # MAX_SESSIONS_PER_USER
    grace: int = 10  # REFRESH_REUSE_GRACE; 0 makes every second use reuse
    lifetime: int = 1_209_600  # REFRESH_TOKEN_TTL: how long a session lives from its login

    def new_session(self, user: str, now: int, user_agent: str, ip: str) -> Session:
        """Return a session that starts at ``now``, with its first refresh token's id."""
        expires_at = now + self.lifetime
        return Session(
            new_id(), user, new_id(), now, now, now, expires_at,
            self.idle_deadline(now, expires_at), user_agent, ip,
        )  # fmt: skip

    def forgives(self, seconds_since_rotation: int) -> bool:
        """Tell whether the token spent that long ago may still be retried (RFC 9700 §4.14.2)."""
        return self.grace > 0 and seconds_since_rotation <= self.grace

    def is_current(self, session: Session, claims: dict, now: int) -> bool:
        """Tell whether a refresh token is the session's current one, or just spent and forgiven."""
        jti = claims["jti"]
        spent_just_now = jti == session.previous_jti and self.forgives(now - session.rotated_at)
        return jti == session.jti or spent_just_now

    def idle_deadline(self, now: int, expires_at: int) -> int | None:
        """Return when a session used at ``now`` goes idle: never after its absolute end."""
        return min(now + self.idle_ttl, expires_at) if self.idle_ttl else None


class Rotation(enum.Enum):
    """What became of a refresh token presented for rotation."""

    ROTATED = "rotated"  # it was the session's current token; the new one replaces it
    REPLAYED = "replayed"  # it was the one just spent, within the grace window: no change
    REUSED = "reused"  # it was spent before: the session is now ended
    UNKNOWN = "unknown"  # no live session: ended, expired or idle


class Store(Protocol):
    """The interface every backend implements; every change to a session is atomic."""

    kind: str  # "memory" or "redis", for GET /healthz

    def start(self, session: Session, now: int) -> list[str]:
        """Add a session; end the user's least recently used ones beyond the cap, and return their ids."""  # noqa: E501

    def rotate(
        self, sid: str, jti: str, *, new_jti: str, user: str, now: int, ip: str
    ) -> tuple[Rotation, Session | None]:
        """Replace ``jti`` by ``new_jti`` if ``jti`` is current; return the outcome and session."""

    def get(self, sid: str, now: int) -> Session | None:
        """Return the live session ``sid``, or None."""

    def sessions(self, user: str, now: int) -> list[Session]:
        """Return the user's live sessions, most recently used first."""

    def end(self, sid: str, user: str, now: int) -> bool:
        """End the user's live session ``sid``; tell whether there was one to end."""

    def end_all(self, user: str, keep: str | None = None) -> list[str]:
        """End every session of the user but ``keep``; return the ids ended."""

    def ping(self) -> None:
        """Return if the store answers; raise if it does not."""


class MemoryStore:
    """The store of one process: dictionaries behind one lock.

    Lookups are by key, so their cost does not grow with the number of sessions. Ended
    sessions are ignored when read and swept out once the dictionary has doubled since the
    last sweep, so memory follows the live sessions, not every login since start.
    """

    kind = "memory"

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
            for dead in [s for s in self._of_user(session.user) if not s.live(now)]:
                self._drop(dead.id)
            mine = self._by_user.get(session.user, [])
            evicted = []
            # A cap per user bounds the memory one account can take (OWASP Session Mgmt).
            while len(mine) >= self._policy.max_sessions:
                evicted.append(mine[0])
                self._drop(mine[0])
            self._sessions[session.id] = dataclasses.replace(session)  # ours, not the caller's
            self._by_user.setdefault(session.user, []).append(session.id)
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
            if session.user != user:  # not this user's: refuse, end nothing
                return Rotation.UNKNOWN, None
            if jti == session.jti:
                session.previous_jti, session.rotated_at = jti, now
                session.jti, session.issued_at, session.last_used_at, session.ip = (
                    new_jti, now, now, ip,
                )  # fmt: skip
                session.idle_expires_at = self._policy.idle_deadline(now, session.expires_at)
                mine = self._by_user[session.user]
                mine.append(mine.pop(mine.index(sid)))  # now the most recently used
                return Rotation.ROTATED, dataclasses.replace(session)
            if jti == session.previous_jti and self._policy.forgives(now - session.rotated_at):
                return Rotation.REPLAYED, dataclasses.replace(session)
            self._drop(sid)
            return Rotation.REUSED, None

    def get(self, sid: str, now: int) -> Session | None:
        with self._lock:
            session = self._sessions.get(sid)
            return dataclasses.replace(session) if session and session.live(now) else None

    def sessions(self, user: str, now: int) -> list[Session]:
        with self._lock:
            recent_first = reversed(self._of_user(user))
            return [dataclasses.replace(s) for s in recent_first if s.live(now)]

    def end(self, sid: str, user: str, now: int) -> bool:
        with self._lock:
            session = self._sessions.get(sid)
            if session is None or session.user != user:
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
        mine = self._by_user[session.user]
        mine.remove(sid)
        if not mine:
            del self._by_user[session.user]

    def _sweep(self, now: int) -> None:
        # One full pass each time the size doubles keeps the cost per login constant.
        if len(self._sessions) < max(1024, 2 * self._swept_at_size):
            return
        for sid in [sid for sid, s in self._sessions.items() if not s.live(now)]:
            self._drop(sid)
        self._swept_at_size = len(self._sessions)


# Fail fast when Redis is down: one immediate retry (for a connection Redis dropped while
# idle), then the error, within seconds, so the client gets its 503 promptly.
REDIS_OPTIONS = {"socket_timeout": 2, "socket_connect_timeout": 2, "retry": Retry(NoBackoff(), 1)}

# The fields of a session's hash, in the order the scripts below read them.
FIELDS = ("user", "jti", "iat", "created", "used", "exp", "idle", "ua", "ip", "prev", "rotated")

# Every change below reads and writes in one Lua script: Redis runs a script atomically (no
# other command in between), so two processes can never both rotate one token, and a global
# logout racing a refresh never leaves a live session. Each script first drops a session
# whose deadline has passed by the caller's clock; Redis's own expiry (EXPIREAT) is the
# garbage collector behind it. The user's index is a sorted set of session ids scored by
# last use; it expires with the latest of its sessions, so nothing accumulates.
COMMON = """
local prefix, now = ARGV[1], tonumber(ARGV[2])
local function key(sid) return prefix .. 'session:' .. sid end
local function alive(sid)
    local exp, idle = unpack(redis.call('HMGET', key(sid), 'exp', 'idle'))
    return exp and tonumber(exp) > now and (idle == '' or tonumber(idle) > now)
end
local function drop(index, sid)
    redis.call('DEL', key(sid))
    redis.call('ZREM', index, sid)
end
local function touch(index, sid)
    -- Score a session by its last use; within one second, by order of use, a thousandth
    -- apart, so that the least recently used is always the lowest.
    local top = redis.call('ZRANGE', index, -1, -1, 'WITHSCORES')
    local score = now
    if top[2] then
        local highest = tonumber(top[2])
        if top[1] == sid then score = math.max(highest, now)
        elseif highest >= now then score = highest + 0.001 end
    end
    redis.call('ZADD', index, string.format('%.3f', score), sid)
end
local function expire_with(index, deadline)
    -- Never shortened, since later sessions may remain (EXPIRETIME and GT need Redis 7).
    local ttl = redis.call('TTL', index)
    if ttl < 0 or tonumber(redis.call('TIME')[1]) + ttl < tonumber(deadline) then
        redis.call('EXPIREAT', index, deadline)
    end
end
"""

# KEYS: the user's index. ARGV: prefix, now, cap, sid, deadline, then field/value pairs.
START_SCRIPT = (
    COMMON
    + """
local index, cap, sid, deadline = KEYS[1], tonumber(ARGV[3]), ARGV[4], ARGV[5]
for _, other in ipairs(redis.call('ZRANGE', index, 0, -1)) do
    if not alive(other) then drop(index, other) end
end
local evicted = {}
while redis.call('ZCARD', index) >= cap do
    local oldest = redis.call('ZRANGE', index, 0, 0)[1]
    drop(index, oldest)
    table.insert(evicted, oldest)
end
redis.call('HSET', key(sid), unpack(ARGV, 6))
redis.call('EXPIREAT', key(sid), deadline)
touch(index, sid)
expire_with(index, deadline)
return evicted
"""
)

# KEYS: the user's index. ARGV: prefix, now, sid, jti, new jti, ip, grace, idle ttl, then
# the names of FIELDS. Returns {outcome}, or {outcome, the session's FIELDS after}, where the
# outcome is 0 unknown, 1 reused, 2 rotated, 3 replayed.
ROTATE_SCRIPT = (
    COMMON
    + """
local index, sid, jti = KEYS[1], ARGV[3], ARGV[4]
if not alive(sid) then drop(index, sid) return {0} end
local current, prev, rotated, exp = unpack(
    redis.call('HMGET', key(sid), 'jti', 'prev', 'rotated', 'exp'))
if jti == current then
    local idle_ttl, idle = tonumber(ARGV[8]), ''
    if idle_ttl > 0 then idle = math.min(now + idle_ttl, tonumber(exp)) end
    redis.call('HSET', key(sid), 'jti', ARGV[5], 'iat', now, 'prev', jti, 'rotated', now,
               'used', now, 'ip', ARGV[6], 'idle', idle)
    local deadline = idle == '' and exp or idle
    redis.call('EXPIREAT', key(sid), deadline)
    touch(index, sid)
    expire_with(index, deadline)
    return {2, unpack(redis.call('HMGET', key(sid), unpack(ARGV, 9)))}
end
local grace = tonumber(ARGV[7])
if jti == prev and grace > 0 and now - tonumber(rotated) <= grace then
    return {3, unpack(redis.call('HMGET', key(sid), unpack(ARGV, 9)))}
end
drop(index, sid)
return {1}
"""
)

# KEYS: the user's index. ARGV: prefix, now, the session to keep ('' for none).
END_ALL_SCRIPT = (
    COMMON
    + """
local index, ended = KEYS[1], {}
for _, sid in ipairs(redis.call('ZRANGE', index, 0, -1)) do
    if sid ~= ARGV[3] then
        drop(index, sid)
        table.insert(ended, sid)
    end
end
return ended
"""
)

# KEYS: the user's index. ARGV: prefix, now, the session, the user. Ends only their own.
END_SCRIPT = (
    COMMON
    + """
local index, sid = KEYS[1], ARGV[3]
if redis.call('HGET', key(sid), 'user') ~= ARGV[4] then return 0 end
local was_alive = alive(sid)
drop(index, sid)
return was_alive and 1 or 0
"""
)
OUTCOMES = [Rotation.UNKNOWN, Rotation.REUSED, Rotation.ROTATED, Rotation.REPLAYED]


class RedisStore:
    """The store shared by every process: a hash per session, a sorted set per user.

    ``session:<id>`` holds the session's fields and expires at its deadline (EXAT);
    ``user:<id>:sessions`` indexes a user's sessions by last use. Redis errors propagate: the
    app answers 503 rather than accept a token unchecked.
    """

    kind = "redis"

    def __init__(self, client: redis.Redis, policy: Policy = Policy(), prefix: str = "jwt:"):
        self._redis = client
        self._policy = policy
        self._prefix = prefix
        self._start = client.register_script(START_SCRIPT)
        self._rotate = client.register_script(ROTATE_SCRIPT)
        self._end = client.register_script(END_SCRIPT)
        self._end_all = client.register_script(END_ALL_SCRIPT)

    def start(self, session: Session, now: int) -> list[str]:
        pairs = [value for pair in zip(FIELDS, to_fields(session), strict=True) for value in pair]
        deadline = session.deadline
        args = [self._prefix, now, self._policy.max_sessions, session.id, deadline, *pairs]
        return [sid.decode() for sid in self._start(keys=[self._index(session.user)], args=args)]

    def rotate(
        self, sid: str, jti: str, *, new_jti: str, user: str, now: int, ip: str
    ) -> tuple[Rotation, Session | None]:
        policy = self._policy
        args = [self._prefix, now, sid, jti, new_jti, ip, policy.grace, policy.idle_ttl, *FIELDS]
        outcome, *values = self._rotate(keys=[self._index(user)], args=args)
        if not values:
            return OUTCOMES[outcome], None
        return OUTCOMES[outcome], from_fields(sid, [value.decode() for value in values])

    def get(self, sid: str, now: int) -> Session | None:
        values = self._redis.hmget(self._key(sid), FIELDS)
        if values[0] is None:
            return None
        session = from_fields(sid, [value.decode() for value in values])
        return session if session.live(now) else None

    def sessions(self, user: str, now: int) -> list[Session]:
        index = self._index(user)
        sids = [sid.decode() for sid in self._redis.zrange(index, 0, -1, desc=True)]
        with self._redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hmget(self._key(sid), FIELDS)
            rows = pipe.execute()
        live = [
            session
            for sid, values in zip(sids, rows, strict=True)
            if values[0] is not None
            and (session := from_fields(sid, [v.decode() for v in values])).live(now)
        ]
        return live  # most recently used first, as the index orders them

    def end(self, sid: str, user: str, now: int) -> bool:
        return bool(self._end(keys=[self._index(user)], args=[self._prefix, now, sid, user]))

    def end_all(self, user: str, keep: str | None = None) -> list[str]:
        ended = self._end_all(keys=[self._index(user)], args=[self._prefix, 0, keep or ""])
        return [sid.decode() for sid in ended]

    def ping(self) -> None:
        self._redis.ping()

    def _key(self, sid: str) -> str:
        return f"{self._prefix}session:{sid}"

    def _index(self, user: str) -> str:
        return f"{self._prefix}user:{user}:sessions"


def to_fields(session: Session) -> list[str | int]:
    """Return a session's values in the order of FIELDS."""
    s = session
    idle = "" if s.idle_expires_at is None else s.idle_expires_at
    return [s.user, s.jti, s.issued_at, s.created_at, s.last_used_at, s.expires_at, idle,
            s.user_agent, s.ip, s.previous_jti, s.rotated_at]  # fmt: skip


def from_fields(sid: str, values: list[str]) -> Session:
    """Return the session whose hash holds ``values``, in the order of FIELDS."""
    user, jti, iat, created, used, exp, idle, ua, ip, prev, rotated = values
    return Session(
        sid, user, jti, int(iat), int(created), int(used), int(exp),
        int(idle) if idle else None, ua, ip, prev, int(rotated),
    )  # fmt: skip
