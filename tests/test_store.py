import threading
import time

import pytest

from store import MemoryStore, Rotation


class FakeClock:
    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture(params=["memory"])
def store(request):
    """Every backend, so that one suite holds them all to the same behaviour."""
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
