"""One suite for every store: sessions, rotation, the grace window, ending, idle and cap."""

import dataclasses
import subprocess
import sys
import threading
import time

import pytest
import redis

from redis_store import REDIS_OPTIONS, RedisStore, connect, parse_url
from store import MemoryStore, Policy, Rotation, Session

from .conftest import ROOT, SECRETS, user_env

# Each test moves its own clock by passing `now`; a day ahead, so that deadlines passed to
# Redis as EXPIREAT stay in its future however long the suite runs.
NOW = int(time.time()) + 86_400
POLICY = Policy(idle_ttl=3600, max_sessions=3, grace=10, lifetime=86_400)


@pytest.fixture(params=["memory", "redis", "cluster-redis", "cluster-valkey"])
def make_store(request):
    """Build a store of each backend with a policy, so one suite holds them to one behaviour:
    memory, one Redis, and a real three-master Redis Cluster of each flavour installed."""
    if request.param.startswith("cluster-"):
        nodes = request.getfixturevalue("redis_cluster_of")(request.param.split("-")[1])
        nodes.flushall()
        client, _ = connect(nodes.url, parse_url(nodes.url))  # the app's own way
        request.addfinalizer(client.close)
        request.addfinalizer(nodes.flushall)

    def make(policy=POLICY):
        if request.param == "redis":
            return RedisStore(request.getfixturevalue("redis_client"), policy)
        if request.param.startswith("cluster-"):
            return RedisStore(client, policy)
        return MemoryStore(policy)

    return make


@pytest.fixture
def store(make_store):
    return make_store()


def begin(store, user="alice", *, now=NOW, policy=POLICY, user_agent="curl/8", ip="10.0.0.1"):
    session = policy.new_session(user, now, user_agent, ip)
    return session, store.start(session, now)


def get(store, session, now=NOW):
    return store.get(session.id, session.user_id, now)


def rotate(store, session, jti, now=NOW, new_jti="next"):
    return store.rotate(
        session.id, jti, new_jti=new_jti, user=session.user_id, now=now, ip="10.0.0.2"
    )


def test_new_ids_are_128_bits_of_base64url():
    session = POLICY.new_session("alice", NOW, "", "")
    assert len(session.id) >= 22 and len(session.jti) >= 22
    assert session.id != session.jti


def test_a_session_copy_is_equal_in_every_field_and_its_own_object():
    session = POLICY.new_session("alice", NOW, "curl/8", "10.0.0.1")
    session.previous_jti = "spent"  # every field, the defaulted one too, set
    copy = session.copy()
    assert copy == session and copy is not session
    assert [getattr(copy, f.name) for f in dataclasses.fields(Session)] == [
        getattr(session, f.name) for f in dataclasses.fields(Session)
    ]


def test_what_the_store_returns_is_the_callers_own(store):
    # Changing a session the store returned changes nothing stored, and a later rotation
    # (another request's) does not change what an earlier caller holds.
    session, _ = begin(store)
    _, rotated = rotate(store, session, session.jti, new_jti="second")
    held = get(store, session)
    for returned in (rotated, *store.sessions("alice", NOW)):
        returned.jti, returned.expires_at = "changed", NOW
    assert get(store, session).jti == "second" and get(store, session).live(NOW)
    rotate(store, session, "second", now=NOW + 20, new_jti="third")
    assert (held.jti, held.last_used_at) == ("second", NOW)
    assert get(store, session, NOW + 20).jti == "third"


def test_rotation_replaces_the_current_token(store):
    session, _ = begin(store)
    outcome, after = rotate(store, session, session.jti, NOW + 5, "jti-2")
    assert outcome is Rotation.ROTATED
    assert (after.jti, after.last_used_at, after.last_used_at, after.ip) == (
        "jti-2",
        NOW + 5,
        NOW + 5,
        "10.0.0.2",
    )
    assert after.expires_at == session.expires_at  # rotation never extends a session
    assert rotate(store, after, "jti-2", NOW + 6, "jti-3")[0] is Rotation.ROTATED


def test_the_predecessor_within_the_grace_window_gets_the_current_token(store):
    session, _ = begin(store)
    _, after = rotate(store, session, session.jti, NOW, "jti-2")
    for offset in (0, 10):  # the window's edges, inclusive
        outcome, replayed = rotate(store, session, session.jti, NOW + offset, "ignored")
        assert outcome is Rotation.FORGIVEN_RETRY
        assert replayed == after  # nothing changed: same jti, iat, last use, ip and deadline


def test_the_predecessor_after_the_window_is_reuse(store):
    session, _ = begin(store)
    _, after = rotate(store, session, session.jti, NOW, "jti-2")
    assert rotate(store, session, session.jti, NOW + 11)[0] is Rotation.REUSE_ENDED_SESSION
    assert rotate(store, after, "jti-2", NOW + 12)[0] is Rotation.UNKNOWN
    assert get(store, session, NOW + 12) is None


def test_an_older_token_is_reuse_even_within_the_window(store):
    session, _ = begin(store)
    rotate(store, session, session.jti, NOW, "jti-2")
    rotate(store, session, "jti-2", NOW + 1, "jti-3")
    assert rotate(store, session, session.jti, NOW + 2)[0] is Rotation.REUSE_ENDED_SESSION


def test_no_grace_makes_any_second_use_reuse(make_store):
    policy = Policy(idle_ttl=0, max_sessions=3, grace=0)
    store = make_store(policy)
    session, _ = begin(store, policy=policy)
    rotate(store, session, session.jti, NOW, "jti-2")
    assert rotate(store, session, session.jti, NOW)[0] is Rotation.REUSE_ENDED_SESSION


def test_unknown_session(store):
    session = POLICY.new_session("alice", NOW, "", "")
    assert rotate(store, session, session.jti) == (Rotation.UNKNOWN, None)


def test_absolute_expiry_ends_a_session(store):
    session, _ = begin(store)
    assert get(store, session, session.expires_at - 1) is None  # idle ends it first here
    short = Policy(idle_ttl=0, max_sessions=3, lifetime=100)
    session, _ = begin(store, policy=short)
    assert get(store, session, NOW + 99) is not None
    assert get(store, session, NOW + 100) is None
    assert rotate(store, session, session.jti, NOW + 100)[0] is Rotation.UNKNOWN


def test_idle_timeout_ends_a_session_that_is_not_refreshed(store):
    session, _ = begin(store)
    assert session.idle_expires_at == NOW + 3600
    assert get(store, session, NOW + 3599) is not None
    assert get(store, session, NOW + 3600) is None
    assert rotate(store, session, session.jti, NOW + 3600)[0] is Rotation.UNKNOWN


def test_rotation_resets_the_idle_deadline_but_never_the_absolute_one(store):
    session, _ = begin(store)
    now, jti = NOW, session.jti
    for step in range(30):  # refreshed every 50 minutes, for 25 hours
        now += 3000
        outcome, session = rotate(store, session, jti, now, f"jti-{step}")
        if outcome is not Rotation.ROTATED:
            break
        jti = session.jti
        assert session.idle_expires_at == min(now + 3600, session.expires_at)
    assert outcome is Rotation.UNKNOWN and now >= NOW + 86_400


def test_the_idle_deadline_is_never_after_the_absolute_one(make_store):
    policy = Policy(idle_ttl=3600, lifetime=1000)
    store = make_store(policy)
    session, _ = begin(store, policy=policy)
    assert session.idle_expires_at == session.expires_at == NOW + 1000
    _, after = rotate(store, session, session.jti, NOW + 10, "jti-2")
    assert after.idle_expires_at == session.expires_at


def test_idle_timeout_off(make_store):
    policy = Policy(idle_ttl=0, max_sessions=3, lifetime=86_400)
    store = make_store(policy)
    session, _ = begin(store, policy=policy)
    assert session.idle_expires_at is None
    assert get(store, session, NOW + 86_399).idle_expires_at is None


def test_sessions_lists_the_users_live_sessions_most_recent_first(store):
    first, _ = begin(store, now=NOW)
    second, _ = begin(store, now=NOW + 1)
    begin(store, user="bob")
    rotate(store, first, first.jti, NOW + 2, "jti-2")
    assert [s.id for s in store.sessions("alice", NOW + 3)] == [first.id, second.id]
    assert store.sessions("carol", NOW) == []


def test_end_ends_only_the_owners_live_session(store):
    mine, _ = begin(store)
    theirs, _ = begin(store, user="bob")
    assert not store.end(theirs.id, "alice", NOW)
    assert store.get(theirs.id, "bob", NOW) is not None
    assert store.end(mine.id, "alice", NOW)
    assert not store.end(mine.id, "alice", NOW)  # already ended
    assert not store.end("never-was", "alice", NOW)
    assert rotate(store, mine, mine.jti)[0] is Rotation.UNKNOWN


def test_a_session_is_found_only_under_its_user(store):
    mine, _ = begin(store)
    assert store.get(mine.id, "alice", NOW) == mine
    assert store.get(mine.id, "bob", NOW) is None  # every token names its user: ask for it


def test_logins_of_one_user_released_together_all_start_and_keep_the_cap(store):
    # On Redis each login's script must be told every session of the user; logins landing
    # between make it run again, with the sessions it found.
    results = released_together(16, lambda n: begin(store, now=NOW + n % 2))
    live = store.sessions("alice", NOW + 2)
    assert len(live) == POLICY.max_sessions
    started = {session.id for session, _ in results}
    evicted = [sid for _, ended in results for sid in ended]
    assert len(evicted) == len(set(evicted)) == 16 - POLICY.max_sessions
    assert set(evicted) | {s.id for s in live} == started


def test_an_expired_session_is_not_ended_twice(store):
    session, _ = begin(store)
    assert not store.end(session.id, "alice", NOW + 3600)


def test_end_all_keeps_one_or_none(store):
    keep, _ = begin(store)
    other, _ = begin(store)
    bobs, _ = begin(store, user="bob")
    assert store.end_all("alice", keep=keep.id) == [other.id]
    assert [s.id for s in store.sessions("alice", NOW)] == [keep.id]
    assert store.end_all("alice") == [keep.id]
    assert store.sessions("alice", NOW) == []
    assert store.get(bobs.id, "bob", NOW) is not None


def test_a_login_beyond_the_cap_evicts_the_least_recently_used(store):
    sessions = [begin(store, now=NOW + n)[0] for n in range(3)]
    rotate(store, sessions[0], sessions[0].jti, NOW + 10, "jti-2")  # the oldest is now used
    newest, evicted = begin(store, now=NOW + 11)
    assert evicted == [sessions[1].id]
    live = {s.id for s in store.sessions("alice", NOW + 12)}
    assert live == {sessions[0].id, sessions[2].id, newest.id}


def test_ended_sessions_do_not_count_towards_the_cap(store):
    for n in range(3):
        session, _ = begin(store, now=NOW + n)
        store.end(session.id, "alice", NOW + n)
    assert begin(store, now=NOW + 5)[1] == []


def test_concurrent_rotation_without_grace_has_exactly_one_winner(make_store):
    store = make_store(Policy(grace=0))
    session, _ = begin(store, policy=Policy(grace=0))
    outcomes = released_together(16, lambda n: rotate(store, session, session.jti, NOW, f"new-{n}"))
    kinds = [outcome for outcome, _ in outcomes]
    assert kinds.count(Rotation.ROTATED) == 1
    assert kinds.count(Rotation.REUSE_ENDED_SESSION) + kinds.count(Rotation.UNKNOWN) == 15


def test_concurrent_rotation_with_grace_gives_everyone_the_same_session(store):
    session, _ = begin(store)
    outcomes = released_together(16, lambda n: rotate(store, session, session.jti, NOW, f"new-{n}"))
    kinds = [outcome for outcome, _ in outcomes]
    assert kinds.count(Rotation.ROTATED) == 1
    assert kinds.count(Rotation.FORGIVEN_RETRY) == 15
    assert len({(after.jti, after.last_used_at) for _, after in outcomes}) == 1


def test_a_global_logout_racing_refreshes_leaves_nothing_alive(store):
    sessions = [begin(store)[0] for _ in range(3)]

    def act(n):
        if n == 0:
            return store.end_all("alice")
        session = sessions[n % 3]
        return rotate(store, session, session.jti, NOW, f"new-{n}")

    released_together(17, act)
    assert store.sessions("alice", NOW) == []
    assert all(get(store, s, NOW) is None for s in sessions)


def released_together(count, action):
    """Run action(n) on `count` threads released by one barrier; return the results."""
    barrier, results = threading.Barrier(count), [None] * count

    def run(n):
        barrier.wait()
        results[n] = action(n)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_ping_and_kind(store):
    store.ping()
    assert store.kind in ("memory", "redis")


def test_memory_store_drops_ended_sessions():
    store = MemoryStore(Policy(idle_ttl=0, lifetime=10))
    for n in range(1500):
        begin(store, user=f"old-{n}", policy=Policy(idle_ttl=0, lifetime=10))
    for n in range(1500):
        begin(store, user=f"new-{n}", now=NOW + 20, policy=Policy(idle_ttl=0, lifetime=10))
    assert len(store) == 1500  # the 1500 live; the 1500 expired are gone


def test_redis_keys_expire_with_their_session(redis_client):
    store = RedisStore(redis_client, POLICY)
    now = int(time.time())
    session, _ = begin(store, now=now)
    key = f"jwt:{{alice}}:session:{session.id}"  # the user's id is the hash tag
    assert 3595 <= redis_client.ttl(key) <= 3600  # the idle deadline
    assert 3595 <= redis_client.ttl("jwt:{alice}:sessions") <= 3600
    rotate(store, session, session.jti, now + 1000, "jti-2")
    assert 4595 <= redis_client.ttl(key) <= 4600
    assert 4595 <= redis_client.ttl("jwt:{alice}:sessions") <= 4600


def test_redis_index_forgets_ended_sessions(redis_client):
    store = RedisStore(redis_client, POLICY)
    session, _ = begin(store)
    store.end(session.id, "alice", NOW)
    assert redis_client.exists("jwt:{alice}:sessions") == 0
    assert redis_client.keys("jwt:*") == []


def test_redis_store_is_shared_between_clients(redis_url, redis_client):
    session, _ = begin(RedisStore(redis_client, POLICY))
    other = RedisStore(redis.Redis.from_url(redis_url), POLICY)
    assert rotate(other, session, session.jti)[0] is Rotation.ROTATED


def test_redis_failure_is_raised_not_hidden():
    store = RedisStore(redis.Redis(port=1, **REDIS_OPTIONS))
    session = POLICY.new_session("alice", NOW, "", "")
    with pytest.raises(redis.ConnectionError):
        rotate(store, session, session.jti)


def test_within_one_second_the_cap_still_evicts_the_least_recently_used(make_store):
    policy = Policy(max_sessions=2)
    store = make_store(policy)
    first, second = (begin(store, now=NOW, policy=policy)[0] for _ in range(2))
    assert begin(store, now=NOW, policy=policy)[1] == [first.id]  # all in the same second
    rotate(store, second, second.jti, NOW, "jti-2")  # used: now the most recent
    third = store.sessions("alice", NOW)[-1]
    assert begin(store, now=NOW, policy=policy)[1] == [third.id]
    assert store.sessions("alice", NOW)[-1].id == second.id


def test_without_redis_url_redis_py_is_never_loaded():
    """The in-memory store, the default, does not pay for the Redis backend's import."""
    redis_url = "redis://127.0.0.1:1/0"  # nothing answers: the app starts and says so
    loaded = (
        "import sys, server; server.create_app();"
        "print(sorted({'redis', 'redis_store'} & set(sys.modules)))"
    )
    for settings, expected in [({}, "[]"), ({"REDIS_URL": redis_url}, "['redis', 'redis_store']")]:
        answer = subprocess.run(
            [sys.executable, "-c", loaded], env=user_env(**SECRETS, **settings), cwd=ROOT,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert answer.stdout.strip() == expected, answer.stderr
