import threading
import time

import pytest
import redis

from store import REDIS_OPTIONS, MemoryStore, RedisStore, Rotation


class FakeClock:
    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture(params=["memory", "redis"])
def store(request):
    """Every backend, so that one suite holds them all to the same behaviour."""
    if request.param == "redis":
        return RedisStore(request.getfixturevalue("redis_client"))
    return MemoryStore()


def later(seconds=60):
    return int(time.time()) + seconds


def test_rotation_replaces_the_current_token(store):
    store.start("fam", "jti-1", later())
    assert store.rotate("fam", "jti-1", "jti-2") is Rotation.ROTATED
    assert store.rotate("fam", "jti-2", "jti-3") is Rotation.ROTATED


def test_a_spent_token_is_reuse_and_revokes_the_family(store):
    store.start("fam", "jti-1", later())
    store.rotate("fam", "jti-1", "jti-2")
    assert store.rotate("fam", "jti-1", "jti-x") is Rotation.REUSED
    assert store.rotate("fam", "jti-2", "jti-3") is Rotation.UNKNOWN


def test_families_are_independent(store):
    store.start("fam-a", "a-1", later())
    store.start("fam-b", "b-1", later())
    store.rotate("fam-a", "a-1", "a-2")
    store.rotate("fam-a", "a-1", "a-x")  # reuse in family a
    assert store.rotate("fam-b", "b-1", "b-2") is Rotation.ROTATED


def test_unknown_family(store):
    assert store.rotate("nobody", "jti", "jti-2") is Rotation.UNKNOWN


def test_revoked_family_is_unknown(store):
    store.start("fam", "jti-1", later())
    store.revoke("fam")
    assert store.rotate("fam", "jti-1", "jti-2") is Rotation.UNKNOWN
    store.revoke("fam")  # revoking twice is harmless


def test_expired_family_is_unknown(store):
    store.start("fam", "jti-1", int(time.time()) - 1)
    assert store.rotate("fam", "jti-1", "jti-2") is Rotation.UNKNOWN


def test_deny_list(store):
    store.deny("access-1", later())
    assert store.is_denied("access-1")
    assert not store.is_denied("access-2")


def test_denial_ends_with_the_token_expiry(store):
    store.deny("access-1", int(time.time()) - 1)
    assert not store.is_denied("access-1")


def test_concurrent_rotation_has_exactly_one_winner(store):
    store.start("fam", "jti-1", later())
    barrier = threading.Barrier(16)
    outcomes = []

    def rotate(n):
        barrier.wait()
        outcomes.append(store.rotate("fam", "jti-1", f"new-{n}"))

    threads = [threading.Thread(target=rotate, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count(Rotation.ROTATED) == 1
    assert outcomes.count(Rotation.REUSED) + outcomes.count(Rotation.UNKNOWN) == 15


def test_memory_store_rotation_expires_with_the_clock():
    clock = FakeClock()
    store = MemoryStore(clock)
    store.start("fam", "jti-1", int(clock.now) + 10)
    clock.now += 11
    assert store.rotate("fam", "jti-1", "jti-2") is Rotation.UNKNOWN


def test_memory_store_drops_expired_entries():
    clock = FakeClock()
    store = MemoryStore(clock)
    for n in range(1500):
        store.start(f"old-{n}", "jti", int(clock.now) + 10)
        store.deny(f"old-{n}", int(clock.now) + 10)
    clock.now += 20
    for n in range(1500):
        store.start(f"new-{n}", "jti", int(clock.now) + 10)
        store.deny(f"new-{n}", int(clock.now) + 10)
    assert len(store) == 3000  # the 1500 live of each kind; the 3000 expired are gone


def test_ping_and_kind(store):
    store.ping()
    assert store.kind in ("memory", "redis")


def test_redis_keys_expire_with_their_session(redis_client):
    store = RedisStore(redis_client)
    store.start("fam", "jti-1", later(100))
    store.rotate("fam", "jti-1", "jti-2")
    store.deny("access-1", later(50))
    assert 95 <= redis_client.ttl("jwt:family:fam") <= 100  # rotation kept the family's expiry
    assert 45 <= redis_client.ttl("jwt:denied:access-1") <= 50


def test_redis_store_is_shared_between_clients(redis_url, redis_client):
    RedisStore(redis_client).start("fam", "jti-1", later())
    other = RedisStore(redis.Redis.from_url(redis_url))
    assert other.rotate("fam", "jti-1", "jti-2") is Rotation.ROTATED


def test_redis_failure_is_raised_not_hidden():
    store = RedisStore(redis.Redis(port=1, **REDIS_OPTIONS))
    with pytest.raises(redis.ConnectionError):
        store.rotate("fam", "jti-1", "jti-2")
