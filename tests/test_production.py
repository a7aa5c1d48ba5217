"""The production server (granian) with several workers, sharing one Redis, as deployed."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import (
    DEMO,
    SECRETS,
    WITH_DEMO,
    call,
    free_port,
    granian,
    refresh_body,
    run_to_end,
    serve,
    user_env,
)


def audit_pids(log_path, event):
    records = [
        json.loads(line[line.index("{") :])
        for line in log_path.read_text().splitlines()
        if '"audit"' in line
    ]
    return {record["pid"] for record in records if record["audit"] == event}


@pytest.fixture
def cluster(start_cluster):
    return start_cluster()


def test_refreshes_land_on_both_workers_and_all_succeed(cluster):
    url, log_path = cluster
    tokens = call(url, "POST", "/login", DEMO)[2]
    for _ in range(200):  # the kernel picks the worker: go on until both have served
        status, _, tokens = call(url, "POST", "/token", refresh_body(tokens))
        assert status == 200
        if len(audit_pids(log_path, "refreshed")) == 2:
            break
    assert call(url, "GET", "/me", token=tokens["accessToken"])[0] == 200
    assert len(audit_pids(log_path, "refreshed")) == 2  # both workers served refreshes


def test_reuse_is_detected_across_workers(shared_cluster):
    url, _ = shared_cluster(REFRESH_REUSE_GRACE="0")
    first = call(url, "POST", "/login", DEMO)[2]
    chain = [first]
    for _ in range(6):
        chain.append(call(url, "POST", "/token", refresh_body(chain[-1]))[2])
    assert call(url, "POST", "/token", refresh_body(first))[0] == 403
    assert call(url, "POST", "/token", refresh_body(chain[-1]))[0] == 403


def test_sixteen_simultaneous_refreshes_across_workers_without_grace_have_one_winner(
    shared_cluster,
):
    url, _ = shared_cluster(REFRESH_REUSE_GRACE="0")
    tokens = call(url, "POST", "/login", DEMO)[2]
    barrier = threading.Barrier(16)

    def refresh_once(_):
        barrier.wait()
        return call(url, "POST", "/token", refresh_body(tokens))[0]

    with ThreadPoolExecutor(16) as pool:
        assert sorted(pool.map(refresh_once, range(16))) == [200] + [403] * 15


def test_health_names_the_store(cluster):
    url, _ = cluster
    assert call(url, "GET", "/healthz")[2] == {"status": "ok", "store": "redis"}


def test_memory_store_under_granian_warns(tmp_path):
    port = free_port()
    with serve(granian(port, workers=1), user_env(**SECRETS), tmp_path, port) as (
        url,
        log_path,
    ):
        assert call(url, "GET", "/healthz")[2] == {"status": "ok", "store": "memory"}
    assert "with the in-memory store" in log_path.read_text()
    assert "Set REDIS_URL" in log_path.read_text()


def test_granian_refuses_to_start_without_secrets(tmp_path):
    status, output = run_to_end(granian(free_port()), user_env(), tmp_path)
    assert status != 0
    assert "ACCESS_TOKEN_SECRET must be set under granian" in output


# --- Redis failing and coming back ---------------------------------------------------------


def assert_unavailable(status, headers, body):
    assert status == 503
    assert headers["Retry-After"] == "5"
    assert body == {
        "error": "store_unavailable",
        "message": "The session store is not answering. Try again in a few seconds.",
    }


def test_redis_down_fails_closed_and_recovers(own_redis, tmp_path):
    port = free_port()
    env = user_env(**WITH_DEMO, REDIS_URL=own_redis.url)
    with serve(granian(port), env, tmp_path, port) as (url, _):
        tokens = call(url, "POST", "/login", DEMO)[2]
        own_redis.stop()
        assert_unavailable(*call(url, "POST", "/token", refresh_body(tokens)))
        assert_unavailable(*call(url, "POST", "/logout", refresh_body(tokens)))
        assert_unavailable(*call(url, "POST", "/login", DEMO))
        assert_unavailable(*call(url, "GET", "/me", token=tokens["accessToken"]))
        assert call(url, "GET", "/healthz")[0] == 503
        own_redis.start()  # empty: the sessions before the outage are gone
        assert call(url, "GET", "/healthz")[2] == {"status": "ok", "store": "redis"}
        assert call(url, "POST", "/token", refresh_body(tokens))[0] == 403
        fresh = call(url, "POST", "/login", DEMO)[2]
        assert call(url, "POST", "/token", refresh_body(fresh))[0] == 200
