"""Benchmark the service with wrk, beside peers with the same API, in one run.

    python bench/run.py --peers              # N = 0, 10k, 100k, 1M; ours and every peer
    python bench/run.py --smoke              # one small N, a few seconds (CI)
    python bench/run.py --sessions 0 --metrics   # ours with metrics on and off
    python bench/run.py --peers --sessions 0 --rounds 3   # each row 3 times: medians
    python bench/run.py --peers --redis-url redis://127.0.0.1:6379/13   # and ours on Redis
    python bench/run.py --redis-url redis://127.0.0.1:6379/13 --local-cluster  # and a Cluster
    python bench/run.py --peers --local-redis --local-cluster   # a Redis and a Cluster of its own
    python bench/run.py --redis-url redis+cluster://10.0.0.1:7000,10.0.0.2:7000  # any Cluster
    python bench/run.py --servers granian,gunicorn --sessions 0 --duration 10
    python bench/run.py --peer-cmd "name=node server.js"          # any peer, started here
    python bench/run.py --peer name=http://127.0.0.1:3200          # any peer, running

The server is pinned to core 0 and wrk to core 1, and so are the Redis servers the run starts
itself (--local-redis, --local-cluster): on core 1, as if on a machine of their own. For each
N, our server starts afresh and its worker builds the app with create_app and fills its
store (bench/app.py). --peers adds the peers in bench/peers/ (see bench/README.md). A peer
started here gets PORT (also {port} in its command), SEED_SESSIONS=N and the two secrets in
its environment; one that fails to start is reported and skipped. A run writes its report to
bench/results/runs/<time>/ after every row, or to bench/results/ itself with --update.
"""

import argparse
import json
import os
import platform
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from importlib.util import find_spec
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402

PEERS = BENCH / "peers"
RESULTS = BENCH / "results"
# Each route of each server is driven this long before it is measured, not counted: a fresh
# process's first requests are slower, and no row should pay for being the first of a run.
WARMUP_SECONDS = 2
CHAINS = 64  # refresh-token chains per wrk run; more than its connections (bench/app.py)
BIN = shlex.quote(str(Path(sys.executable).parent))  # granian and gunicorn, from this venv

SERVER_CORE, WRK_CORE = "0", "1"  # the server measured, and the load and the Redis servers
THREADS = 2  # granian's blocking threads, for ours and for the Python peers alike
GRANIAN = (
    BIN + "/granian --interface wsgi --factory --workers 1 --blocking-threads {threads} "
    "--host 127.0.0.1 --port {{port}}"
)
SERVERS = {
    "granian": GRANIAN.format(threads=THREADS) + " bench.app:create_bench_app",
    "granian-1-thread": GRANIAN.format(threads=1) + " bench.app:create_bench_app",
    # The production command's interface: bodies read before a thread (slow_clients.py).
    "granian-rsgi": BIN + "/granian --interface rsgi --factory --workers 1 --host 127.0.0.1 "
    "--port {port} bench.app:create_bench_app",
    "gunicorn": BIN + "/gunicorn --workers 1 --timeout 600 --bind 127.0.0.1:{port} "
    "bench.app:create_bench_app()",
    "gunicorn-gthread": BIN + "/gunicorn --workers 1 --threads 4 --worker-class gthread "
    "--timeout 600 --bind 127.0.0.1:{port} bench.app:create_bench_app()",
}
DEMO = {"email": "demo@example.com", "password": "demo-password"}
# What goes wrong when a server does not start or answer, or the service's code does not
# import; such a measurement is reported as skipped, and the run goes on.
FAILURES = (RuntimeError, OSError, ValueError, KeyError, ImportError, subprocess.SubprocessError)


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    results = Results(args)
    print(f"bench: writing to {results.folder}", file=sys.stderr)
    try:
        measure_all(args, results)
    except KeyboardInterrupt:
        sys.exit(f"bench: interrupted; the rows measured so far are in {results.folder}")
    results.set("elapsed_s", round(time.monotonic() - started))
    print(report.markdown(results.data))
    print(f"bench: {results.folder}, {results.data['elapsed_s']} s in all", file=sys.stderr)
    if args.smoke and results.failed():
        sys.exit(f"bench smoke: failed: {', '.join(results.failed())}")


def measure_all(args: argparse.Namespace, results: "Results") -> None:
    """Every row: for each N, ours, ours on each Redis (smallest N only), then each peer."""
    with ExitStack() as stack:
        if args.local_redis:
            args.redis_url.append(stack.enter_context(local_redis()))
        if args.local_cluster:
            args.redis_url.append(stack.enter_context(local_cluster()))
        measure_rows(args, results)


def measure_rows(args: argparse.Namespace, results: "Results") -> None:
    peers = args.peer_cmd + (project_peers(results) if args.peers else [])
    redis_urls = [url for url in args.redis_url if usable_redis(url, results)]
    if not args.redis_url:
        results.note("No Redis rows: give --redis-url to measure the Redis store.")
    # Bytes per session: on one Redis (a Cluster's masters each hold the same kind of keys).
    redis_url = next((url for url in redis_urls if not url.startswith("redis+cluster")), None)
    ours = args.servers[0]
    for sessions in args.sessions:
        rows = [(our_name(server), partial(measure_ours, server, sessions, args))
                for server in args.servers]  # fmt: skip
        if args.metrics and sessions == min(args.sessions):
            off = partial(measure_ours, ours, sessions, args, metrics=False)
            rows.append((our_name(ours, metrics=False), off))
        for url in redis_urls if sessions == min(args.sessions) else []:
            on_redis = partial(measure_ours_on_redis, url, sessions, args)
            rows.append((our_name(ours, store_of(url)), on_redis))
        for name, command in peers:
            rows.append((name, partial(measure_peer_cmd, name, command, sessions, args)))
        # The targets' ratios are taken at the smallest N: there, each row is measured in
        # every round, every other round in the reverse order, and the report takes medians.
        # At the largest N only ours is, for the target of /token there against the smallest.
        smallest = sessions == min(args.sessions)
        largest = sessions == max(args.sessions) and not smallest
        rounds = args.rounds if smallest or largest else 1
        for round_ in range(1, rounds + 1):
            measured = rows if smallest or round_ == 1 else rows[:1]
            for name, measure in measured if round_ % 2 else measured[::-1]:
                several = rounds > 1 and (smallest or name == rows[0][0])
                results.measure(name, measure, round_=round_ if several else 0)
    for name, url in args.peer:
        results.measure(name, partial(measure_peer, name, url, None, args))
    if not args.smoke:
        results.measure("POST /login", partial(measure_login, args), key="login")
    memory = partial(measure_memory, args.sessions, redis_url)
    results.measure("memory per session", memory, key="memory")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", default="0,10000,100000,1000000")
    parser.add_argument("--servers", default="granian", help=", ".join(SERVERS))
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument(
        "--warmup", type=int, default=WARMUP_SECONDS, help="seconds of each route not measured"
    )
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--peers", action="store_true", help="also run bench/peers/")
    parser.add_argument("--peer", action="append", default=[], help="NAME=URL, running")
    parser.add_argument("--peer-cmd", action="append", default=[], help="NAME=COMMAND")
    parser.add_argument(
        "--redis-url",
        action="append",
        default=[],
        help="an empty Redis database of the benchmark's own, e.g. .../13, or a Redis Cluster "
        "(redis+cluster://host:port,...) that is empty; each one a row",
    )
    parser.add_argument(
        "--local-cluster",
        action="store_true",
        help="start a three-master Redis Cluster on loopback (tests/topology.py) for a row",
    )
    parser.add_argument(
        "--local-redis",
        action="store_true",
        help="start a Redis server on loopback, pinned to wrk's core, for a row",
    )
    parser.add_argument("--smoke", action="store_true", help="N=1000, 2 s: that it runs")
    parser.add_argument(
        "--metrics", action="store_true", help="also ours with metrics off, at the smallest N"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure each row at the smallest N this many times, in alternating order, and "
        "ours at the largest N; the targets take each row's median (a noisy machine: 3 or 5)",
    )
    parser.add_argument("--update", action="store_true", help="write to bench/results/")
    args = parser.parse_args()
    if args.smoke:
        args.sessions, args.duration, args.warmup = "1000", 2, 1
    args.sessions = [int(n) for n in args.sessions.split(",")]
    args.servers = args.servers.split(",")
    args.peer = [tuple(peer.split("=", 1)) for peer in args.peer]
    args.peer_cmd = [tuple(peer.split("=", 1)) for peer in args.peer_cmd]
    return args


class Results:
    """The run's measurements, written out in full after each one, so none is lost."""

    def __init__(self, args: argparse.Namespace) -> None:
        if args.update:
            self.folder = RESULTS
        else:  # a folder of the run's own; bench/.gitignore keeps them out of git
            self.folder = RESULTS / "runs" / time.strftime("%Y%m%d-%H%M%S")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stem = "smoke" if args.smoke else "results"
        self.data = {
            "machine": machine(),
            "connections": args.connections,
            "duration": args.duration,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "ours": our_name(args.servers[0]),
            "ours_redis": our_name(args.servers[0], "Redis"),
            "ours_cluster": our_name(args.servers[0], "Redis Cluster"),
            "ours_without_metrics": our_name(args.servers[0], metrics=False),
            "runs": [],
            "skipped": [],
            "notes": [],
        }
        self.plot = not args.smoke and find_spec("matplotlib") is not None
        if not args.smoke and not self.plot:
            self.note("No plot: matplotlib is missing (pip install -r bench/requirements.txt).")

    def measure(
        self, name: str, measure: Callable[[], object], key: str = "", round_: int = 0
    ) -> None:
        """Keep what ``measure`` returns (a row, of ``round_`` if several, or ``key``'s
        value), or report why not."""
        try:
            value = measure()
        except FAILURES as error:
            self.skip(f"{name}: {error}" + (f" (round {round_})" if round_ else ""))
            return
        if key:
            self.set(key, value)
            return
        if round_:
            value["round"] = round_
        self.data["runs"].append(value)
        print(
            f"{value['name']}, {value['sessions']} sessions{report.of_round(value)}: /token "
            f"{value['token']['rps']:.0f} req/s, /me {value['me']['rps']:.0f} req/s",
            file=sys.stderr,
            flush=True,
        )
        self.save()

    def skip(self, reason: str) -> None:
        """Record a measurement that could not be made, with the first line of why."""
        print(f"bench: skipped {reason}", file=sys.stderr, flush=True)
        self.data["skipped"].append(reason.strip().splitlines()[0][:300])
        self.save()

    def note(self, text: str) -> None:
        """Record something the reader of the report should know, such as Redis left out."""
        print(f"bench: {text}", file=sys.stderr, flush=True)
        self.data["notes"].append(text)
        self.save()

    def set(self, key: str, value: object) -> None:
        self.data[key] = value
        self.save()

    def save(self) -> None:
        report.write(self.data, self.folder, self.stem, self.plot)

    def failed(self) -> list[str]:
        """What failed: rows with failed requests, and measurements skipped."""
        names = [run["name"] for run in self.data["runs"] if report.errors(run)]
        return names + [reason.split(":")[0] for reason in self.data["skipped"]]


def machine() -> dict:
    with open("/proc/cpuinfo") as cpuinfo:
        models = [line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line]
    cpu = models[0] if models else platform.processor()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load": os.getloadavg()[0],  # other work on the machine skews every number
    }


@dataclass
class Launch:
    """How to start one server and how to tell it is ready."""

    command: list[str]
    port: int
    env: dict = field(default_factory=dict)  # added to this process's environment
    ready: Path | None = None  # a file the server writes once its store is filled
    timeout: float = 60


@contextmanager
def serving(launch: Launch) -> Iterator[str]:
    """Start the server on core 0, yield its URL once it is ready, stop it afterwards."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            ["taskset", "-c", SERVER_CORE, *launch.command],
            env=os.environ | launch.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so Ctrl-C stops the run, and the run stops the server
        )
        try:
            deadline = time.monotonic() + launch.timeout
            while not ((launch.ready is None or launch.ready.exists()) and listening(launch.port)):
                if process.poll() is not None:
                    log.seek(0)
                    lines = log.read().decode(errors="replace").splitlines()
                    said = [line for line in lines if line.strip() and "[INFO]" not in line]
                    raise RuntimeError(f"exited with {process.returncode}. {' / '.join(said[-2:])}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"did not start in {launch.timeout:.0f} s")
                time.sleep(0.1)
            yield f"http://127.0.0.1:{launch.port}"
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the server and its workers
                process.wait()


def our_name(server: str, store: str = "", metrics: bool = True) -> str:
    """Our row's name: the server, the store unless it is memory, and metrics if off."""
    extra = (f", {store}" if store else "") + ("" if metrics else ", metrics off")
    return f"this service ({server}{extra})"


def store_of(redis_url: str) -> str:
    """The store a REDIS_URL names, as our row's name says it."""
    return "Redis Cluster" if redis_url.startswith("redis+cluster://") else "Redis"


def our_launch(
    server: str, sessions: int, tokens_file: Path, redis_url: str = "", metrics: bool = True
) -> Launch:
    """Our server: bench/app.py, filled with ``sessions``, on the memory store or Redis."""
    port = free_port()
    env = {
        "ACCESS_TOKEN_SECRET": secrets.token_urlsafe(32),
        "REFRESH_TOKEN_SECRET": secrets.token_urlsafe(32),
        "ACCESS_TOKEN_TTL": "86400",  # the /me token must outlive the run
        "BENCH_SESSIONS": str(sessions),
        "BENCH_TOKENS": str(tokens_file),
        "PYTHONPATH": str(ROOT),
        "REDIS_URL": redis_url,  # set even when empty, so a .env cannot set it
        "BENCH_METRICS": "on" if metrics else "off",
    }
    command = shlex.split(SERVERS[server].format(port=port))
    return Launch(command, port, env, ready=tokens_file, timeout=60 + sessions / 10_000)


def measure_ours(
    server: str,
    sessions: int,
    args: argparse.Namespace,
    *,
    redis_url: str = "",
    metrics: bool = True,
) -> dict:
    """Start our server filled with ``sessions``, and drive /token and /me."""
    with tempfile.TemporaryDirectory() as tmp:
        tokens_file = Path(tmp) / "tokens.json"
        launch = our_launch(server, sessions, tokens_file, redis_url, metrics)
        with serving(launch) as url:
            tokens = json.loads(tokens_file.read_text())
            name = our_name(server, store_of(redis_url) if redis_url else "", metrics)
            run = drive(name, url, tokens, args)
    run |= {"sessions": sessions, "server": server}
    if sessions:
        run["rss_per_session"] = (tokens["rss_after"] - tokens["rss_before"]) / sessions
    return run


def redis_client(url: str):
    """A client of the Redis or Redis Cluster a REDIS_URL names, as the service makes it."""
    from redis_store import connect, parse_url

    return connect(url, parse_url(url))[0]


def usable_redis(url: str, results: Results) -> bool:
    """Tell whether the Redis answers; if not, the report says its row is left out."""
    from redis_store import RedisStore

    try:
        redis_client(url).ping()
    except (*RedisStore.unavailable, ValueError) as error:
        results.note(f"No row for {hide_password(url)}: it does not answer ({error}).")
        return False
    return True


def hide_password(url: str) -> str:
    from redis_store import hide

    return hide(url, urllib.parse.urlsplit(url).password)


@contextmanager
def local_redis() -> Iterator[str]:
    """One Redis server on loopback for the run, on wrk's core; yield its URL."""
    from tests.topology import COMMON_ARGS, Binaries, Node, free_port, wait_until

    if (binaries := Binaries.find()) is None:
        sys.exit("bench: --local-redis needs redis-server and redis-cli on PATH")
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        command = ["taskset", "-c", WRK_CORE, binaries.server, "--port", str(port)]
        node = Node(port, folder, [*command, *COMMON_ARGS])
        node.start()
        try:
            wait_until(node.ping, 30, f"redis-server on port {port}", [node.log])
            print(f"bench: a local Redis at 127.0.0.1:{port}", file=sys.stderr)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            node.stop()
            node.reap()


@contextmanager
def local_cluster() -> Iterator[str]:
    """A three-master Redis Cluster on loopback, no replicas, for the run, its nodes on wrk's
    core; yield its URL."""
    from tests.topology import RedisClusterNodes

    with tempfile.TemporaryDirectory() as folder, RedisClusterNodes(folder, replicas=0) as nodes:
        for node in nodes.nodes.values():  # each thread of the running node
            for thread in Path(f"/proc/{node.process.pid}/task").iterdir():
                os.sched_setaffinity(int(thread.name), {int(WRK_CORE)})
        print(f"bench: a local Redis Cluster at {nodes.url}", file=sys.stderr)
        yield nodes.url


def measure_ours_on_redis(url: str, sessions: int, args: argparse.Namespace) -> dict:
    """Our first server on Redis, in an empty database: every key in it is then the run's."""
    client = redis_client(url)
    if held := client.dbsize():  # a Cluster's: the sum over its masters
        # The service cannot be given a key prefix from its environment, so only an empty
        # database tells its keys from the user's; the run touches nothing else.
        where = hide_password(url)
        raise RuntimeError(f"{where} holds {held} keys; give an empty database of its own")
    try:
        return measure_ours(args.servers[0], sessions, args, redis_url=url)
    finally:
        deleted = delete_keys(client, "*")
        print(
            f"bench: deleted the {deleted} keys the run made in {hide_password(url)}",
            file=sys.stderr,
        )


def project_peers(results: Results) -> list[tuple[str, str]]:
    """The peers in bench/peers/, as (name, command); npm installs Express's if need be."""
    granian = GRANIAN.format(threads=THREADS) + f" --working-dir {shlex.quote(str(PEERS))}"
    peers = [
        (report.FLOOR, f"{granian} floor:create_app"),
        (report.FLASK_JWT_EXTENDED, f"{granian} flask_jwt_extended_app:create_app"),
    ]
    express = PEERS / "express"
    if not (express / "node_modules").exists():
        try:
            subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=express, check=True)
        except (OSError, subprocess.CalledProcessError) as error:
            results.skip(f"{report.EXPRESS} and {report.EXPRESS_KEY_OBJECTS}: npm ci: {error}")
            return peers
    server_js = shlex.quote(str(express / "server.js"))
    return peers + [
        (report.EXPRESS, f"node {server_js}"),
        (report.EXPRESS_KEY_OBJECTS, f"env JWT_KEYOBJECT=1 node {server_js}"),
    ]


def measure_peer_cmd(name: str, command: str, sessions: int, args: argparse.Namespace) -> dict:
    """Start a peer with PORT and SEED_SESSIONS, log in through its API, and drive it."""
    port = free_port()
    env = {
        "PORT": str(port),
        "SEED_SESSIONS": str(sessions),
        # Keys of 32 bytes or more, as ours, so PyJWT does not spend time warning.
        "ACCESS_TOKEN_SECRET": secrets.token_urlsafe(32),
        "REFRESH_TOKEN_SECRET": secrets.token_urlsafe(32),
    }
    launch = Launch(
        shlex.split(command.format(port=port)), port, env, timeout=120 + sessions / 5000
    )
    with serving(launch) as url:
        return measure_peer(name, url, sessions, args)


def measure_peer(name: str, url: str, sessions: int | None, args: argparse.Namespace) -> dict:
    """Log in for refresh tokens to rotate through (the warm-up's and the measured run's),
    then drive /token and /me."""
    logins = [post_json(url + "/login", DEMO) for _ in range(2 * CHAINS)]
    tokens = {"refresh": [t["refreshToken"] for t in logins], "access": logins[0]["accessToken"]}
    return drive(name, url, tokens, args) | {"sessions": sessions, "server": "peer"}


def drive(name: str, url: str, tokens: dict, args: argparse.Namespace) -> dict:
    """Run wrk against /token and /me, each after a warm-up; return req/s and latency."""
    # The warm-up rotates chains of its own: a token it spent would be reuse in the run.
    measured, warmup = tokens["refresh"][:CHAINS], tokens["refresh"][CHAINS:]
    stats = {}
    for route, script in (("token", "token.lua"), ("me", "me.lua")):
        for chains, duration in ((warmup, args.warmup), (measured, args.duration)):
            with tempfile.NamedTemporaryFile("w", suffix=".txt") as listing:
                listing.write("\n".join(chains) + "\n")
                listing.flush()
                env = {"BENCH_TOKENS_LIST": listing.name, "BENCH_ACCESS": tokens["access"]}
                if duration:
                    load = {"connections": args.connections, "duration": duration}
                    stats[route] = wrk(url, script, env, **load)
    return {"name": name, **stats}


def wrk(url: str, script: str, env: dict, *, connections: int, duration: int) -> dict:
    """Run one wrk on core 1; return its JSON line (bench/report.lua) with req/s added."""
    command = ["taskset", "-c", WRK_CORE, "wrk", "-t1", f"-c{connections}", f"-d{duration}s"]
    command += ["-s", str(BENCH / script), url]
    output = subprocess.run(
        command,
        env=os.environ | env | {"BENCH_DIR": str(BENCH)},
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 60,
    ).stdout
    stats = json.loads(output.strip().splitlines()[-1])
    stats["rps"] = stats["requests"] / stats["seconds"]
    return stats


def measure_login(args: argparse.Namespace) -> dict:
    """POST /login on an idle server (one connection), then under the run's load."""
    with tempfile.TemporaryDirectory() as tmp:
        launch = our_launch(args.servers[0], 0, Path(tmp) / "tokens.json")
        with serving(launch) as url:
            idle = wrk(url, "login.lua", {}, connections=1, duration=args.duration)
            loaded = wrk(url, "login.lua", {}, connections=args.connections, duration=args.duration)
    return {"idle": idle, "loaded": loaded}


def measure_memory(sizes: list[int], redis_url: str | None) -> list[dict]:
    """Bytes per live session in the memory store (tracemalloc), and in Redis (INFO memory)."""
    from bench.app import fill
    from store import MemoryStore

    rows = []
    expires_at = int(time.time()) + 86_400
    for n in [size for size in sizes if size]:
        tracemalloc.start()
        baseline = tracemalloc.get_traced_memory()[0]
        store = MemoryStore()
        fill(store, n, expires_at)
        row = {"sessions": n, "memory_store": (tracemalloc.get_traced_memory()[0] - baseline) / n}
        tracemalloc.stop()
        del store
        if redis_url:
            row["redis_store"] = redis_bytes_per_session(redis_url, n, expires_at)
        rows.append(row)
    return rows


def redis_bytes_per_session(url: str, n: int, expires_at: int) -> float:
    """Fill a RedisStore under a prefix of this run's own, measure, delete exactly its keys."""
    import redis

    from bench.app import fill
    from redis_store import RedisStore

    client = redis.Redis.from_url(url)
    prefix = f"bench-{secrets.token_hex(4)}:"
    before = client.info("memory")["used_memory"]
    try:
        fill(RedisStore(client, prefix=prefix), n, expires_at)
        return (client.info("memory")["used_memory"] - before) / n
    finally:
        delete_keys(client, f"{prefix}*")


def delete_keys(client, pattern: str) -> int:
    """Delete the keys matching ``pattern``, a thousand at a time; never FLUSHDB."""
    deleted, batch = 0, []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) == 1000:
            deleted += client.delete(*batch)
            batch = []
    return deleted + (client.delete(*batch) if batch else 0)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


if __name__ == "__main__":
    main()
