"""Count the Redis commands each route costs, and the bytes each session takes: counts, not
timings, so they hold on any machine and a quiet one is not needed.

    python bench/commands.py                      # one Redis and a Cluster, started here
    python bench/commands.py --redis-url redis://127.0.0.1:6379/13   # an empty database
    python bench/commands.py --redis-url redis+cluster://10.0.0.1:7000  # an empty Cluster

Every route is called once through the app (create_app, the Flask test client), after one
call to warm it up, while MONITOR runs on every master: what the service sends ("sent", the
round trips) and what runs inside its Lua scripts ("in scripts"). redis-server must be on
PATH for the ones started here.
"""

import argparse
import logging
import sys
import tempfile
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from redis_store import connect, parse_url  # noqa: E402
from server import create_app  # noqa: E402

DEMO = {"email": "demo@example.com", "password": "demo-password"}
SETTINGS = {
    "ACCESS_TOKEN_SECRET": "bench-access-secret-0123456789abcdef",
    "REFRESH_TOKEN_SECRET": "bench-refresh-secret-0123456789abcdef",
    "LOGIN_RATE_LIMIT": "1000 per minute",
}
MARK = "bench-commands-end"  # echoed to each master when a route is done
SESSIONS_FOR_MEMORY = 2000


def masters(url: str) -> list[Callable[[], redis.Redis]]:
    """How to make a plain client of each master: the server itself, or each of the Cluster."""
    if not url.startswith("redis+cluster://"):
        return [partial(redis.Redis.from_url, url)]
    cluster, _ = connect(url, parse_url(url))
    password = urllib.parse.urlsplit(url).password
    nodes = [(node.host, node.port) for node in cluster.get_primaries()]
    cluster.close()
    return [partial(redis.Redis, host=host, port=port, password=password) for host, port in nodes]


@contextmanager
def monitoring(url: str) -> Iterator[list[dict]]:
    """Collect every command the masters run until the block ends."""
    seen: list[dict] = []
    nodes = [make() for make in masters(url)]
    markers = [make() for make in masters(url)]
    threads = []
    for node, marker in zip(nodes, markers, strict=True):
        marker.ping()  # its connection made now, so that its mark below adds no HELLO
        monitor = node.monitor()
        monitor.__enter__()  # MONITOR is on once this returns

        def collect(monitor=monitor):
            for command in monitor.listen():
                if command["command"] == f"ECHO {MARK}":
                    return
                seen.append(command)

        threads.append((monitor, threading.Thread(target=collect)))
    for _, thread in threads:
        thread.start()
    try:
        yield seen
    finally:
        for marker in markers:
            marker.echo(MARK)
        for monitor, thread in threads:
            thread.join()
            monitor.__exit__()


def count(seen: list[dict]) -> tuple[Counter, Counter]:
    """The commands sent by clients, and those run inside scripts, by name."""
    sent, scripted = Counter(), Counter()
    for command in seen:
        name = command["command"].split(" ", 1)[0].strip('"').upper()
        (scripted if command["client_type"] == "lua" else sent)[name] += 1
    return sent, scripted


def tokens_of(client) -> dict:
    return client.post("/login", json=DEMO).json


def bearer(tokens: dict) -> dict:
    return {"Authorization": f"Bearer {tokens['accessToken']}"}


def first_login(client):
    return lambda: client.post("/login", json=DEMO)


def another_login(client):
    tokens_of(client)
    return lambda: client.post("/login", json=DEMO)


def refresh(client):
    body = {"refreshToken": tokens_of(client)["refreshToken"]}
    return lambda: client.post("/token", json=body)


def me(client):
    headers = bearer(tokens_of(client))
    return lambda: client.get("/me", headers=headers)


def sessions(client):
    tokens_of(client)
    headers = bearer(tokens_of(client))
    return lambda: client.get("/sessions", headers=headers)


def logout(scope):
    def prepare(client):
        body = {"refreshToken": tokens_of(client)["refreshToken"], "scope": scope}
        return lambda: client.post("/logout", json=body)

    return prepare


# Each route: how to prepare it (not counted), which returns the call that is counted.
ROUTES = {
    "POST /login, the user's first session": first_login,
    "POST /login, the user has another session": another_login,
    "POST /login, wrong password": lambda client: (
        lambda: client.post("/login", json=DEMO | {"password": "wrong-password"})
    ),
    "POST /token": refresh,
    "GET /me": me,
    "GET /sessions (2 sessions)": sessions,
    "POST /logout": logout("local"),
    "POST /logout, scope global": logout("global"),
    "GET /healthz": lambda client: lambda: client.get("/healthz"),
}


def commands_per_route(url: str) -> dict[str, tuple[Counter, Counter]]:
    """Each route's commands on the Redis or Cluster ``url`` names: (sent, in scripts)."""
    app = create_app(SETTINGS | {"REDIS_URL": url, "DEMO_USER_PASSWORD": DEMO["password"]})
    client, store = app.test_client(), app.extensions["store"]
    demo = app.extensions["users"].authenticate(DEMO["email"], DEMO["password"]).id
    counts = {}
    for name, prepare in ROUTES.items():
        store.end_all(demo)
        prepare(client)()  # warm: the scripts loaded, the cluster's map read
        store.end_all(demo)  # each route starts from no session of the demo account
        call = prepare(client)
        with monitoring(url) as seen:
            status = call().status_code
        assert status < 500, (name, status)
        counts[name] = count(seen)
    return counts


def bytes_per_session(url: str, sessions: int = SESSIONS_FOR_MEMORY) -> float:
    """What ``sessions`` sessions of as many users add to used_memory, summed over masters."""
    from bench.app import fill
    from redis_store import RedisStore

    client, _ = connect(url, parse_url(url))
    nodes = [make() for make in masters(url)]
    before = sum(node.info("memory")["used_memory"] for node in nodes)
    fill(RedisStore(client, prefix="bench-memory:"), sessions, 2_000_000_000)
    after = sum(node.info("memory")["used_memory"] for node in nodes)
    for node in nodes:
        keys = list(node.scan_iter(match="bench-memory:*", count=1000))
        for start in range(0, len(keys), 500):
            for key in keys[start : start + 500]:
                node.delete(key)  # one key at a time: a Cluster refuses keys of two slots
    return (after - before) / sessions


def table(url: str) -> str:
    """The Markdown table of one Redis or Cluster."""
    lines = [
        f"Commands per request on {url.split('@')[-1]} (MONITOR on every master):",
        "",
        "| route | sent by the service | run inside its scripts |",
        "|---|---|---|",
    ]
    for name, (sent, scripted) in commands_per_route(url).items():
        lines.append(f"| {name} | {describe(sent)} | {describe(scripted)} |")
    lines += ["", f"Bytes per session (used_memory): {bytes_per_session(url):.0f}", ""]
    return "\n".join(lines)


def describe(counts: Counter) -> str:
    if not counts:
        return "none"
    total = sum(counts.values())
    return f"{total}: " + ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))


@contextmanager
def started_here() -> Iterator[list[str]]:
    """One redis-server and a three-master Cluster, on loopback, for this run."""
    from tests.topology import Node, RedisClusterNodes, free_port, wait_until

    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        port = free_port()
        command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        one = Node(port, folder / "one", command)
        one.start()
        stack.callback(one.reap)
        stack.callback(one.stop)
        wait_until(one.ping, 10, "redis-server to answer")
        cluster = stack.enter_context(RedisClusterNodes(folder / "cluster", replicas=0))
        yield [f"redis://127.0.0.1:{port}/0", cluster.url]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", action="append", default=[], help="an empty database")
    args = parser.parse_args()
    logging.getLogger("audit").disabled = True  # its lines are not the table
    with ExitStack() as stack:
        urls = args.redis_url or stack.enter_context(started_here())
        for url in urls:
            print(table(url))


if __name__ == "__main__":
    main()
