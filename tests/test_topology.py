"""The harness for Redis Cluster and Sentinel (tests/topology.py) does what it says, proved
with redis-py alone: real processes, a real failover, no mocks. Each test runs once per
flavour (Redis, Valkey) that is installed."""

import contextlib
import time

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from .topology import HOST, wait_until

FAILOVER_DEADLINE = 20  # seconds; a failover here takes three to five


@contextlib.contextmanager
def cluster_client(nodes):
    """A RedisCluster client that knows only the startup nodes of the url."""
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes.startup_nodes],
        decode_responses=True, socket_timeout=1, socket_connect_timeout=1,
    )  # fmt: skip
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def sentinel_master(group):
    """redis-py's Sentinel client and the master client it hands out for the service."""
    sentinel = Sentinel(
        group.sentinels, socket_timeout=1, socket_connect_timeout=1,
        sentinel_kwargs={"socket_timeout": 1, "socket_connect_timeout": 1},
    )  # fmt: skip
    master = sentinel.master_for(group.service_name, decode_responses=True)
    try:
        yield sentinel, master
    finally:
        master.close()
        for client in sentinel.sentinels:
            client.close()


def write_until_it_works(write, deadline=FAILOVER_DEADLINE):
    """Write through a client that may still hold connections to a dead master; bounded."""
    return wait_until(write, deadline, "a write to succeed after the failover")


def test_cluster_url_names_three_masters_each_with_a_replica(redis_cluster):
    masters = redis_cluster.master_ports()
    assert len(masters) == 3
    # The masters it was created with; a test that failed one over leaves it a replica.
    startup = [port for _, port in redis_cluster.startup_nodes]
    assert redis_cluster.url == "redis+cluster://" + ",".join(f"{HOST}:{p}" for p in startup)
    replicas = [redis_cluster.replicas_of(port) for port in masters]
    assert all(p in masters or any(p in ports for ports in replicas) for p in startup)
    assert len(set(startup)) == 3
    assert all(len(ports) == 1 for ports in replicas)
    assert sorted(p for ports in replicas for p in ports) == redis_cluster.replica_ports()
    assert len(set(redis_cluster.ports)) == 6


def test_cluster_client_spreads_keys_over_all_three_masters(redis_cluster):
    keys = [f"spread:{i}" for i in range(60)]
    with cluster_client(redis_cluster) as client:
        for key in keys:
            assert client.set(key, key)
        assert [client.get(key) for key in keys] == keys
        try:
            counts = {
                port: redis_cluster.nodes[port].admin.dbsize()
                for port in redis_cluster.master_ports()
            }
            assert all(count > 0 for count in counts.values()), counts
            assert sum(counts.values()) == len(keys)
        finally:
            client.delete(*keys)  # keys of many slots: redis-py splits the command per slot


def test_hash_tag_puts_one_users_keys_in_one_slot(redis_cluster):
    admin = redis_cluster.nodes[redis_cluster.master_ports()[0]].admin
    slot = admin.execute_command("CLUSTER", "KEYSLOT", "jwt:{u1}:a")
    assert admin.execute_command("CLUSTER", "KEYSLOT", "jwt:{u1}:b") == slot
    assert admin.execute_command("CLUSTER", "KEYSLOT", "u1") == slot  # only the tag counts
    other = next(
        f"jwt:{{u{i}}}:a" for i in range(2, 100) if admin.cluster("keyslot", f"u{i}") != slot
    )
    with cluster_client(redis_cluster) as client:
        assert client.keyslot("jwt:{u1}:a") == slot  # redis-py computes the same slot
        # One slot, so the node that owns it takes both keys in one multi-key command...
        owner = redis_cluster.nodes[client.get_node_from_key("jwt:{u1}:a").port].admin
        assert owner.mset({"jwt:{u1}:a": "1", "jwt:{u1}:b": "2"})
        assert owner.mget("jwt:{u1}:a", "jwt:{u1}:b") == ["1", "2"]
        # ... which the server itself refuses for keys of two slots.
        with pytest.raises(redis.ResponseError, match="same slot"):  # CROSSSLOT
            owner.mset({"jwt:{u1}:a": "1", other: "2"})
        client.delete("jwt:{u1}:a", "jwt:{u1}:b")


def test_cluster_fails_over_when_a_master_dies_and_writes_go_on(redis_cluster):
    with cluster_client(redis_cluster) as client:
        client.set("failover:{k}:before", "kept")
        old = client.get_node_from_key("failover:{k}:before").port
        (replica,) = redis_cluster.replicas_of(old)
        redis_cluster.sync_replicas(old)
        started = time.monotonic()
        try:
            new = redis_cluster.kill_master(old, timeout=FAILOVER_DEADLINE)
            took = time.monotonic() - started
            assert new == replica
            assert old not in redis_cluster.master_ports()
            assert new in redis_cluster.master_ports()
            # The same client object: it finds the new owner of the slot by itself.
            write_until_it_works(lambda: client.set("failover:{k}:after", "written"))
            assert client.get_node_from_key("failover:{k}:after").port == new
            assert client.get("failover:{k}:before") == "kept"  # it was on the replica
            assert took < FAILOVER_DEADLINE
        finally:
            redis_cluster.heal()
        assert redis_cluster.replicas_of(new) == [old]  # the old master came back a replica
        client.delete("failover:{k}:before", "failover:{k}:after")


def test_sentinel_url_names_three_sentinels_and_the_service(redis_sentinel):
    ports = redis_sentinel.sentinel_ports
    assert len(ports) == 3
    assert redis_sentinel.url == (
        "redis+sentinel://" + ",".join(f"{HOST}:{p}" for p in ports) + "/mymaster"
    )
    master = redis_sentinel.master_port()
    assert redis_sentinel.replica_ports() == [p for p in redis_sentinel.ports if p != master]
    for port in ports:
        state = redis_sentinel.sentinel_master(port)
        assert int(state["quorum"]) == 2
        assert int(state["num-other-sentinels"]) == 2
        assert int(state["num-slaves"]) == 1


def test_sentinel_client_writes_through_a_failover(redis_sentinel):
    with sentinel_master(redis_sentinel) as (sentinel, master):
        old = redis_sentinel.master_port()
        (replica,) = redis_sentinel.replica_ports()
        assert sentinel.discover_master("mymaster") == (HOST, old)
        assert master.set("sentinel:before", "kept")
        redis_sentinel.sync_replicas(old)
        started = time.monotonic()
        try:
            new = redis_sentinel.kill_master(timeout=FAILOVER_DEADLINE)
            took = time.monotonic() - started
            assert new == replica
            assert sentinel.discover_master("mymaster") == (HOST, new)
            # The same client object: its pool asks the Sentinels where the master is now.
            write_until_it_works(lambda: master.set("sentinel:after", "written"))
            assert master.get("sentinel:before") == "kept"  # it was on the replica
            assert redis_sentinel.nodes[new].admin.get("sentinel:after") == "written"
            assert took < FAILOVER_DEADLINE
        finally:
            redis_sentinel.heal()
        assert redis_sentinel.replica_ports() == [old]  # the old master came back a replica
        master.delete("sentinel:before", "sentinel:after")
