"""The Redis backend of the store: sessions shared by every worker and machine.

Skip this file on a first read: it does what ``MemoryStore`` in ``store.py`` does, with the
same ``Store`` interface, for Redis. Each change runs as one Lua script, so it is atomic
across processes.
"""

from typing import Any

import redis
from flask import Flask
from limits.storage import RedisStorage
from redis.backoff import NoBackoff
from redis.retry import Retry

from store import Policy, Rotation, Session, Store

# Fail fast when Redis is down: one immediate retry (for a connection Redis dropped while
# idle), then the error, within seconds, so the client gets its 503 promptly.
REDIS_OPTIONS = {"socket_timeout": 2, "socket_connect_timeout": 2, "retry": Retry(NoBackoff(), 1)}

# The fields of a session's hash, in the order the scripts below read them.
# Hashes written before "used" stood for the last rotation also hold "iat" and "rotated",
# always equal to "used": they are read no more.
FIELDS = ("user", "jti", "created", "used", "exp", "idle", "ua", "ip", "prev")

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
# outcome is 0 unknown, 1 reused, 2 rotated, 3 a forgiven retry. Which token counts is the
# rule of Policy.accepts in store.py, its twin.
ROTATE_SCRIPT = (
    COMMON
    + """
local index, sid, jti = KEYS[1], ARGV[3], ARGV[4]
if not alive(sid) then drop(index, sid) return {0} end
local current, prev, used, exp = unpack(
    redis.call('HMGET', key(sid), 'jti', 'prev', 'used', 'exp'))
if jti == current then
    local idle_ttl, idle = tonumber(ARGV[8]), ''
    if idle_ttl > 0 then idle = math.min(now + idle_ttl, tonumber(exp)) end
    redis.call('HSET', key(sid), 'jti', ARGV[5], 'prev', jti, 'used', now, 'ip', ARGV[6],
               'idle', idle)
    local deadline = idle == '' and exp or idle
    redis.call('EXPIREAT', key(sid), deadline)
    touch(index, sid)
    expire_with(index, deadline)
    return {2, unpack(redis.call('HMGET', key(sid), unpack(ARGV, 9)))}
end
local grace = tonumber(ARGV[7])
if jti == prev and grace > 0 and now - tonumber(used) <= grace then
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
OUTCOMES = [
    Rotation.UNKNOWN,
    Rotation.REUSE_ENDED_SESSION,
    Rotation.ROTATED,
    Rotation.FORGIVEN_RETRY,
]


class RedisStore(Store):
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
        return [sid.decode() for sid in self._start(keys=[self._index(session.user_id)], args=args)]

    def rotate(
        self, sid: str, jti: str, *, new_jti: str, user: str, now: int, ip: str
    ) -> tuple[Rotation, Session | None]:
        policy = self._policy
        args: list[Any] = [self._prefix, now, sid, jti, new_jti, ip, policy.grace, policy.idle_ttl]
        args += FIELDS
        outcome, *values = self._rotate(keys=[self._index(user)], args=args)
        if not values:
            return OUTCOMES[outcome], None
        return OUTCOMES[outcome], from_fields(sid, [value.decode() for value in values])

    def get(self, sid: str, now: int) -> Session | None:
        values: list[Any] = self._redis.hmget(self._key(sid), FIELDS)  # type: ignore[assignment]
        if values[0] is None:
            return None
        session = from_fields(sid, [value.decode() for value in values])
        return session if session.live(now) else None

    def sessions(self, user: str, now: int) -> list[Session]:
        index = self._index(user)
        found: list[bytes] = self._redis.zrange(index, 0, -1, desc=True)  # type: ignore[assignment]
        sids = [sid.decode() for sid in found]
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
    return [s.user_id, s.jti, s.created_at, s.last_used_at, s.expires_at, idle, s.user_agent,
            s.ip, s.previous_jti]  # fmt: skip


def from_fields(sid: str, values: list[str]) -> Session:
    """Return the session whose hash holds ``values``, in the order of FIELDS."""
    user_id, jti, created, used, exp, idle, ua, ip, prev = values
    return Session(
        sid, user_id, jti, int(created), int(used), int(exp), int(idle) if idle else None,
        ua, ip, prev or "",
    )  # fmt: skip


def init_app(app: Flask) -> None:
    """Give the app a RedisStore where REDIS_URL is set, after store.init_app."""
    if not app.config["REDIS_URL"]:
        return
    client = redis.Redis.from_url(app.config["REDIS_URL"], **REDIS_OPTIONS)
    app.extensions["store"] = RedisStore(client, app.extensions["policy"])
    # The login counters share the connections: one Redis for sessions and limits.
    app.extensions["counters"] = RedisStorage(
        app.config["REDIS_URL"], connection_pool=client.connection_pool
    )
