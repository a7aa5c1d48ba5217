"""The Redis backend of the store: sessions shared by every worker and machine.

Skip this file on a first read: it does what ``MemoryStore`` in ``store.py`` does, with the
same ``Store`` interface, for Redis: one server, a Redis Cluster, or the master that Sentinels
name. Each change runs as one Lua script, so it is atomic across processes.
"""

import urllib.parse
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from flask import Flask
from limits.errors import ConfigurationError
from limits.storage import RedisClusterStorage, RedisSentinelStorage, RedisStorage, Storage
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from settings import ConfigError
from store import Policy, Rotation, Session, Store

# Fail fast when Redis is down: one immediate retry (for a connection Redis dropped while
# idle), then the error, within seconds, so the client gets its 503 promptly.
REDIS_OPTIONS: dict[str, Any] = {
    "socket_timeout": 2, "socket_connect_timeout": 2, "retry": Retry(NoBackoff(), 1),
}  # fmt: skip
# A cluster client retries a command after reading the cluster's map again: twice, so that a
# request that meets a failover just finished succeeds, and one that meets it under way gets
# its 503 within seconds.
CLUSTER_OPTIONS: dict[str, Any] = REDIS_OPTIONS | {"retry": Retry(NoBackoff(), 2)}
# What REDIS_URL may start with: the spelling of the `limits` library, so that one URL serves
# the sessions and the login counters (unix:// is redis-py's, redis+unix:// limits').
ONE_SERVER = ("redis", "rediss", "unix", "redis+unix")
SCHEMES = (*ONE_SERVER, "redis+cluster", "redis+sentinel")


@dataclass(frozen=True)
class Target:
    """What REDIS_URL points at, without its password: enough to connect and to say where."""

    kind: str  # "redis" (one server), "cluster" or "sentinel"
    locations: tuple[str, ...]  # host:port of the server, the start-up nodes or the Sentinels
    service: str = ""  # the Sentinels' name for the master
    # The URL's user name and password, percent-decoded (limits passes them on as written).
    credentials: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __str__(self) -> str:
        where = ", ".join(self.locations)
        if self.kind == "cluster":
            return f"the Redis Cluster at {where}"
        if self.kind == "sentinel":
            return f"the master the Sentinels at {where} name {self.service!r}"
        return f"the Redis at {where}"

    def login(self) -> dict[str, str]:
        """The user name and password to connect with, those the URL holds."""
        return {name: value for name, value in self.credentials.items() if value}


def parse_url(url: str) -> Target:
    """Read a REDIS_URL as limits spells it; raise ValueError saying why, never its password."""
    scheme, separator, rest = url.partition("://")
    # The credentials are all before the last @; every message below is about the URL without
    # them, so none can quote a piece of the password, however the URL is malformed.
    userinfo, _, location = rest.rpartition("@")
    if any(character in userinfo for character in "/?#"):
        raise ValueError(
            "its user name and password must be percent-encoded (RFC 3986 §3.2.1): "
            "write / ? # @ : % as %2F %3F %23 %40 %3A %25"
        )
    bare = f"{scheme}{separator}{location}"
    parsed = urllib.parse.urlsplit(bare)
    username, _, password = (urllib.parse.unquote(part) for part in userinfo.partition(":"))
    credentials = {"username": username, "password": password}
    if parsed.scheme not in SCHEMES:
        schemes = ", ".join(f"{scheme}://" for scheme in SCHEMES)
        raise ValueError(f"it must start with one of {schemes}")
    if parsed.scheme in ONE_SERVER:
        database = parsed.path.strip("/")
        if parsed.scheme in ("redis", "rediss") and database and not database.isdigit():
            # redis-py would quietly take database 0
            raise ValueError("the path must be a database number, as in redis://host:6379/0")
        try:
            options = redis.connection.parse_url(bare.replace("redis+unix://", "unix://", 1))
        except ValueError as error:
            raise ValueError(hide(str(error), password)) from None
        host, port = options.get("host", "localhost"), options.get("port", 6379)
        where = options.get("path") or f"{host}:{port}"
        return Target("redis", (where,))
    locations = []
    for place in parsed.netloc.split(","):
        try:
            host_port = urllib.parse.urlsplit(f"//{place.strip()}")
            host, port = host_port.hostname, host_port.port
        except ValueError:
            host = port = None
        if not host or port is None:
            raise ValueError(f"{place.strip()!r} is not a host:port")
        locations.append(f"{host}:{port}")
    if parsed.scheme == "redis+cluster":
        return Target("cluster", tuple(locations), credentials=credentials)
    service = parsed.path.strip("/")
    if not service or "/" in service:
        raise ValueError("redis+sentinel:// needs the service's name: host:port,.../NAME")
    return Target("sentinel", tuple(locations), service, credentials)


def hide(text: str, password: str | None) -> str:
    """Return ``text`` with the password, if any, blotted out."""
    return text.replace(password, "***") if password else text


# The fields of a session's hash, in the order the scripts below read them.
FIELDS = ("user", "jti", "created", "used", "exp", "idle", "ua", "ip", "prev")
# How often a login or a logout everywhere runs its script again with the sessions the
# last run found: each new try means another login of the same user landed in between, so
# this bounds the logins of one user at the same moment; beyond it, a 503.
ATTEMPTS = 32

# Every change below reads and writes in one Lua script: Redis runs a script atomically (no
# other command in between), so two processes can never both rotate one token, and a global
# logout racing a refresh never leaves a live session. Each script first drops a session
# whose deadline has passed by the caller's clock; Redis's own expiry (EXPIREAT) is the
# garbage collector behind it. The user's index is a sorted set of session ids scored by
# last use; it expires with the latest of its sessions, so nothing accumulates.
#
# On a Redis Cluster a script may touch only the keys it declares, all in one slot: every key
# of a user carries the user's id as a hash tag (jwt:{<user>}:...), KEYS[1] is the user's
# index and KEYS[2...] the sessions the script may touch. A script that must go through the
# index and finds there a session it was not given writes nothing and returns {RETRY, the
# index's sessions}: the caller runs it again, declaring those. Else it returns {DONE, ...}.
DONE = 0  # the Lua's twin is in COMMON
COMMON = """
local DONE, RETRY = 0, 1
local prefix, now = ARGV[1], tonumber(ARGV[2])
local index = KEYS[1]
local declared = {}
for i = 2, #KEYS do declared[KEYS[i]] = true end
local function key(sid) return prefix .. sid end
local function undeclared(sids)
    for _, sid in ipairs(sids) do
        if not declared[key(sid)] then return true end
    end
    return false
end
local function alive(sid)
    local exp, idle = unpack(redis.call('HMGET', key(sid), 'exp', 'idle'))
    return exp and tonumber(exp) > now and (idle == '' or tonumber(idle) > now)
end
local function drop(sid)
    redis.call('DEL', key(sid))
    redis.call('ZREM', index, sid)
end
local function touch(sid)
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
local function expire_with(deadline)
    -- Never shortened, since later sessions may remain (EXPIRETIME and GT need Redis 7).
    local ttl = redis.call('TTL', index)
    if ttl < 0 or tonumber(redis.call('TIME')[1]) + ttl < tonumber(deadline) then
        redis.call('EXPIREAT', index, deadline)
    end
end
"""

# KEYS: the index, the new session, the sessions the index held when read.
# ARGV: prefix, now, cap, sid, deadline, then field/value pairs.
START_SCRIPT = (
    COMMON
    + """
local cap, sid, deadline = tonumber(ARGV[3]), ARGV[4], ARGV[5]
local others = redis.call('ZRANGE', index, 0, -1)
if undeclared(others) then return {RETRY, unpack(others)} end
for _, other in ipairs(others) do
    if not alive(other) then drop(other) end
end
local evicted = {DONE}
while redis.call('ZCARD', index) >= cap do
    local oldest = redis.call('ZRANGE', index, 0, 0)[1]
    drop(oldest)
    table.insert(evicted, oldest)
end
redis.call('HSET', key(sid), unpack(ARGV, 6))
redis.call('EXPIREAT', key(sid), deadline)
touch(sid)
expire_with(deadline)
return evicted
"""
)

# KEYS: the index, the session. ARGV: prefix, now, sid, jti, new jti, ip, grace, idle ttl.
# Returns {outcome}, or {outcome, the session's FIELDS after}, where the outcome is 0 unknown,
# 1 reused, 2 rotated, 3 a forgiven retry. Which token counts is the rule of Policy.accepts in
# store.py, its twin. The names of FIELDS are written into the script, not sent with each call.
ROTATE_SCRIPT = (
    COMMON
    + f"local FIELDS = {{{', '.join(repr(name) for name in FIELDS)}}}\n"
    + """
local sid, jti = ARGV[3], ARGV[4]
if not alive(sid) then drop(sid) return {0} end
local current, prev, used, exp = unpack(
    redis.call('HMGET', key(sid), 'jti', 'prev', 'used', 'exp'))
if jti == current then
    local idle_ttl, idle = tonumber(ARGV[8]), ''
    if idle_ttl > 0 then idle = math.min(now + idle_ttl, tonumber(exp)) end
    redis.call('HSET', key(sid), 'jti', ARGV[5], 'prev', jti, 'used', now, 'ip', ARGV[6],
               'idle', idle)
    local deadline = idle == '' and exp or idle
    redis.call('EXPIREAT', key(sid), deadline)
    touch(sid)
    expire_with(deadline)
    return {2, unpack(redis.call('HMGET', key(sid), unpack(FIELDS)))}
end
local grace = tonumber(ARGV[7])
if jti == prev and grace > 0 and now - tonumber(used) <= grace then
    return {3, unpack(redis.call('HMGET', key(sid), unpack(FIELDS)))}
end
drop(sid)
return {1}
"""
)

# KEYS: the index, the sessions it held when read. ARGV: prefix, now, the session to keep
# ('' for none).
END_ALL_SCRIPT = (
    COMMON
    + """
local sids, ended = redis.call('ZRANGE', index, 0, -1), {DONE}
if undeclared(sids) then return {RETRY, unpack(sids)} end
for _, sid in ipairs(sids) do
    if sid ~= ARGV[3] then
        drop(sid)
        table.insert(ended, sid)
    end
end
return ended
"""
)

# KEYS: the index, the session. ARGV: prefix, now, the session, the user. Ends only their own.
END_SCRIPT = (
    COMMON
    + """
local sid = ARGV[3]
if redis.call('HGET', key(sid), 'user') ~= ARGV[4] then return 0 end
local was_alive = alive(sid)
drop(sid)
return was_alive and 1 or 0
"""
)
OUTCOMES = [
    Rotation.UNKNOWN,
    Rotation.REUSE_ENDED_SESSION,
    Rotation.ROTATED,
    Rotation.FORGIVEN_RETRY,
]


class IndexKeptChanging(redis.ConnectionError):
    """Logins kept changing a user's index while a script was being given its keys: a 503."""


class RedisStore(Store):
    """The store shared by every process: a hash per session, a sorted set per user.

    ``jwt:{<user>}:session:<id>`` holds a session's fields and expires at its deadline;
    ``jwt:{<user>}:sessions`` indexes the user's sessions by last use. The braces make the
    user's id the hash tag, so a user's keys share one slot of a Redis Cluster, and the users
    spread over its masters. Redis errors propagate: the app answers 503 rather than accept a
    token unchecked.
    """

    kind = "redis"
    # redis-py's cluster errors that are no RedisError (a slot no node serves, a cluster that
    # cannot be reached) mean the same.
    unavailable = (redis.RedisError, RedisClusterException)

    def __init__(
        self, client: redis.Redis | RedisCluster, policy: Policy = Policy(), prefix: str = "jwt:"
    ) -> None:
        self._redis = client
        self._policy = policy
        self._prefix = prefix
        self._start = client.register_script(START_SCRIPT)
        self._rotate = client.register_script(ROTATE_SCRIPT)
        self._end = client.register_script(END_SCRIPT)
        self._end_all = client.register_script(END_ALL_SCRIPT)

    def start(self, session: Session, now: int) -> list[str]:
        user, sid = session.user_id, session.id
        pairs = [value for pair in zip(FIELDS, to_fields(session), strict=True) for value in pair]
        args = [self._sessions(user), now, self._policy.max_sessions, sid, session.deadline]
        evicted = self._with_index(self._start, user, [self._key(user, sid)], args + pairs)
        return [evicted_sid.decode() for evicted_sid in evicted]

    def rotate(
        self, sid: str, jti: str, *, new_jti: str, user: str, now: int, ip: str
    ) -> tuple[Rotation, Session | None]:
        policy = self._policy
        args: list[Any] = [self._sessions(user), now, sid, jti, new_jti, ip]
        args += [policy.grace, policy.idle_ttl]
        keys = [self._index(user), self._key(user, sid)]
        outcome, *values = self._rotate(keys=keys, args=args)
        if not values:
            return OUTCOMES[outcome], None
        return OUTCOMES[outcome], from_fields(sid, [value.decode() for value in values])

    def get(self, sid: str, user: str, now: int) -> Session | None:
        values: list[Any] = self._redis.hmget(self._key(user, sid), FIELDS)  # type: ignore[assignment]
        if values[0] is None:
            return None
        session = from_fields(sid, [value.decode() for value in values])
        return session if session.user_id == user and session.live(now) else None

    def sessions(self, user: str, now: int) -> list[Session]:
        found: list[bytes] = self._redis.zrange(self._index(user), 0, -1, desc=True)  # type: ignore[assignment]
        sids = [sid.decode() for sid in found]
        with self._redis.pipeline(transaction=False) as pipe:  # one slot: one round trip
            for sid in sids:
                pipe.hmget(self._key(user, sid), FIELDS)
            rows = pipe.execute()
        live = [
            session
            for sid, values in zip(sids, rows, strict=True)
            if values[0] is not None
            and (session := from_fields(sid, [v.decode() for v in values])).live(now)
        ]
        return live  # most recently used first, as the index orders them

    def end(self, sid: str, user: str, now: int) -> bool:
        keys = [self._index(user), self._key(user, sid)]
        return bool(self._end(keys=keys, args=[self._sessions(user), now, sid, user]))

    def end_all(self, user: str, keep: str | None = None) -> list[str]:
        ended = self._with_index(self._end_all, user, [], [self._sessions(user), 0, keep or ""])
        return [sid.decode() for sid in ended]

    def ping(self) -> None:
        self._redis.ping()

    def _with_index(self, script: Any, user: str, keys: list[str], args: list[Any]) -> list[bytes]:
        """Run a script that may touch every session in the user's index, declaring them all:
        first none (a first login), then those the last run found."""
        held: list[bytes] = []
        for _ in range(ATTEMPTS):
            declared = [self._key(user, sid.decode()) for sid in held]
            outcome, *sids = script(keys=[self._index(user), *keys, *declared], args=args)
            if outcome == DONE:
                return sids
            held = sids
        raise IndexKeptChanging(f"the index of a user changed {ATTEMPTS} times in a row")

    def _sessions(self, user: str) -> str:
        """Return the start of the keys of the user's sessions: the hash tag is the user."""
        return f"{self._prefix}{{{user}}}:session:"

    def _key(self, user: str, sid: str) -> str:
        return self._sessions(user) + sid

    def _index(self, user: str) -> str:
        return f"{self._prefix}{{{user}}}:sessions"


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


def connect(url: str, target: Target) -> tuple[redis.Redis | RedisCluster, Storage]:
    """Return the client of the sessions and the login counters' storage: one set of
    connections, made from the one URL, as limits reads it."""
    if target.kind == "cluster":
        # limits builds the RedisCluster from the URL; the sessions use that same client.
        cluster = RedisClusterStorage(url, **CLUSTER_OPTIONS | target.login())
        return cluster.storage, cluster
    if target.kind == "sentinel":
        # The master as the Sentinels name it now, for both: a failover moves them together.
        # The counters read from the master too: a replica may lag behind a failed login.
        sentinel = RedisSentinelStorage(
            url, use_replicas=False, sentinel_kwargs=REDIS_OPTIONS, **REDIS_OPTIONS | target.login()
        )
        return cast(redis.Redis, sentinel.storage), sentinel  # master_for's client
    client = redis.Redis.from_url(url.replace("redis+unix://", "unix://", 1), **REDIS_OPTIONS)
    pool = client.connection_pool
    pool.connection_class(**pool.connection_kwargs)  # its options, checked before any request
    return client, RedisStorage(url, connection_pool=pool)


def init_app(app: Flask) -> None:
    """Give the app the RedisStore of REDIS_URL (store.init_app calls this where it is set);
    say at start if it does not answer."""
    url = app.config["REDIS_URL"]
    try:
        target = parse_url(url)
    except ValueError as error:
        raise ConfigError(f"REDIS_URL is not a Redis URL: {error}.") from None
    try:
        client, app.extensions["counters"] = connect(url, target)
    except RedisClusterException as error:  # a cluster client needs a node's map of slots
        raise ConfigError(
            f"REDIS_URL: no start-up node of {target} answers, or each refuses its password "
            f"({type(error).__name__})."
        ) from None
    except ConfigurationError:  # limits' own reading of the URL; its message quotes it whole
        raise ConfigError(f"REDIS_URL: the login limits cannot read it as {target}.") from None
    except (TypeError, redis.RedisError):  # an option in its query redis-py does not take
        raise ConfigError(
            "REDIS_URL: an option in its query is not one redis-py takes, or not a value it "
            "takes (https://redis.readthedocs.io, redis.from_url)."
        ) from None
    store = app.extensions["store"] = RedisStore(client, app.extensions["policy"])
    try:
        store.ping()
    except store.unavailable as error:
        # Said once, at start; every request that needs the store tries again, and answers 503
        # until it answers.
        app.logger.error(
            "REDIS_URL: %s does not answer (%s); requests that need the store answer 503 "
            "until it does.", target, type(error).__name__,
        )  # fmt: skip
