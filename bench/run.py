"""Benchmark the service with wrk, beside any peer with the same API, in one run.

    python bench/run.py                      # N = 0, 10k, 100k, 1M on the chosen server
    python bench/run.py --smoke              # one small N, a few seconds (CI)
    python bench/run.py --servers granian,gunicorn --sessions 0 --duration 10
    python bench/run.py --anchors ../shared/anchors   # with the Express and F-J-E peers
    python bench/run.py --peer-cmd "name=node server.js --port {port}"
    python bench/run.py --peer name=http://127.0.0.1:3200

The server is pinned to core 0 and wrk to core 1. Each N starts a fresh server whose worker
builds the app with create_app and fills its store (bench/app.py). Peers started with
--peer-cmd get PORT (and {port} in the command) and SEED_SESSIONS=N; peers given by --peer
URL are measured as they are. --anchors DIR copies the project's peers (the Express original
and the Flask-JWT-Extended app) to a temporary folder, installs them, and runs them as
--peer-cmd: the Express original as written, with key objects, and F-J-E under granian.
Results go to bench/results/ as JSON, a Markdown table and a PNG plot.
"""

import argparse
import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from auth import Users, new_id  # noqa: E402
from store import MemoryStore, RedisStore  # noqa: E402

GRANIAN = (
    "granian --interface wsgi --factory --workers 1 --blocking-threads {threads} "
    "--host 127.0.0.1 --port {port} bench.app:create_bench_app"
)
SERVERS = {
    "granian": GRANIAN.replace("{threads}", "2"),
    "granian-1-thread": GRANIAN.replace("{threads}", "1"),
    "gunicorn": "gunicorn --workers 1 --timeout 600 --bind 127.0.0.1:{port} "
    "bench.app:create_bench_app()",
    "gunicorn-gthread": "gunicorn --workers 1 --threads 4 --worker-class gthread --timeout 600 "
    "--bind 127.0.0.1:{port} bench.app:create_bench_app()",
}
DEMO = {"email": "demo@example.com", "password": "demo-password"}


def main() -> None:
    args = parse_args()
    if args.anchors:
        args.peer_cmd += anchor_peers(Path(args.anchors).resolve())
    results = {"machine": machine(), "connections": args.connections, "runs": []}

    def record(run: dict) -> None:
        results["runs"].append(run)
        print(
            f"{run['name']}, {run['sessions']} sessions: /token {run['token']['rps']:.0f}"
            f" req/s, /me {run['me']['rps']:.0f} req/s",
            file=sys.stderr,
            flush=True,
        )

    for sessions in args.sessions:
        for server in args.servers:
            record(measure_ours(server, sessions, args))
        for name, command in args.peer_cmd:
            record(measure_peer_cmd(name, command, sessions, args))
    for name, url in args.peer:
        record(measure_peer(name, url, None, args))
    results["login"] = measure_login(args) if not args.smoke else None
    results["memory"] = measure_memory(args.sessions, args.redis_url)
    write_results(results, args)
    failed = [run["name"] for run in results["runs"] if errors(run)]
    if args.smoke and failed:
        sys.exit(f"bench smoke: requests failed on {', '.join(failed)}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", default="0,10000,100000,1000000")
    parser.add_argument("--servers", default="granian")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--peer", action="append", default=[], help="NAME=URL, running")
    parser.add_argument("--peer-cmd", action="append", default=[], help="NAME=COMMAND")
    parser.add_argument("--anchors", help="the folder of the Express and F-J-E peers")
    parser.add_argument("--redis-url", help="also measure the Redis store's memory here")
    parser.add_argument("--smoke", action="store_true", help="N=1000, 2 s: that it runs")
    parser.add_argument("--out", default=str(BENCH / "results"))
    args = parser.parse_args()
    if args.smoke:
        args.sessions, args.duration = "1000", 2
    args.sessions = [int(n) for n in args.sessions.split(",")]
    args.servers = args.servers.split(",")
    args.peer = [tuple(peer.split("=", 1)) for peer in args.peer]
    args.peer_cmd = [tuple(peer.split("=", 1)) for peer in args.peer_cmd]
    return args


def machine() -> dict:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
        platform.processor(),
    )
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def our_server(server: str, sessions: int, tokens_file: Path) -> tuple[list, dict, int]:
    """The command, environment and port that serve bench/app.py on core 0."""
    port = free_port()
    env = os.environ | {
        "ACCESS_TOKEN_SECRET": secrets.token_urlsafe(32),
        "REFRESH_TOKEN_SECRET": secrets.token_urlsafe(32),
        "ACCESS_TOKEN_TTL": "86400",  # the /me token must outlive the run
        "BENCH_SESSIONS": str(sessions),
        "BENCH_TOKENS": str(tokens_file),
        "PYTHONPATH": str(ROOT),
    }
    env.pop("REDIS_URL", None)
    executable, *arguments = SERVERS[server].format(port=port).split()
    command = ["taskset", "-c", "0", str(Path(sys.executable).parent / executable), *arguments]
    return command, env, port


def measure_ours(server: str, sessions: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tokens_file = Path(tmp) / "tokens.json"
        command, env, port = our_server(server, sessions, tokens_file)
        with running(command, env, port, ready=tokens_file, timeout=60 + sessions / 10_000):
            tokens = json.loads(tokens_file.read_text())
            run = drive(f"this service ({server})", f"http://127.0.0.1:{port}", tokens, args)
    run |= {"sessions": sessions, "server": server}
    if sessions:
        run["rss_per_session"] = (tokens["rss_after"] - tokens["rss_before"]) / sessions
    return run


def anchor_peers(anchors: Path) -> list[tuple[str, str]]:
    """Install the peers in a temporary copy (shared/ is read-only); return their commands."""
    copy = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    shutil.copytree(anchors, copy, dirs_exist_ok=True)
    express = copy / "express-original"
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=express, check=True)
    granian = Path(sys.executable).parent / "granian"
    return [
        ("Express original", f"node {express / 'server.js'}"),
        ("Express, key objects", f"env JWT_KEYOBJECT=1 node {express / 'server.js'}"),
        (
            "Flask-JWT-Extended (granian)",
            f"{granian} --interface wsgi --workers 1 --blocking-threads 2 --host 127.0.0.1 "
            f"--port {{port}} --working-dir {copy} flask_jwt_extended_app:app",
        ),
    ]


def measure_peer_cmd(name: str, command: str, sessions: int, args: argparse.Namespace) -> dict:
    port = free_port()
    env = os.environ | {"PORT": str(port), "SEED_SESSIONS": str(sessions)}
    env |= {  # keys of 32 bytes or more, as ours, so PyJWT does not spend time warning
        "ACCESS_TOKEN_SECRET": secrets.token_urlsafe(32),
        "REFRESH_TOKEN_SECRET": secrets.token_urlsafe(32),
    }
    cwd_command = ["taskset", "-c", "0", *command.format(port=port).split()]
    with running(cwd_command, env, port, timeout=120 + sessions / 5_000):
        return measure_peer(name, f"http://127.0.0.1:{port}", sessions, args)


def measure_peer(name: str, url: str, sessions: int | None, args: argparse.Namespace) -> dict:
    logins = [post_json(url + "/login", DEMO) for _ in range(64)]
    tokens = {"refresh": [t["refreshToken"] for t in logins], "access": logins[0]["accessToken"]}
    return drive(name, url, tokens, args) | {"sessions": sessions, "server": "peer"}


def drive(name: str, url: str, tokens: dict, args: argparse.Namespace) -> dict:
    """Run wrk against /token and /me; return req/s and latency for each."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as listing:
        listing.write("\n".join(tokens["refresh"]) + "\n")
    env = os.environ | {
        "BENCH_DIR": str(BENCH),
        "BENCH_TOKENS_LIST": listing.name,
        "BENCH_ACCESS": tokens["access"],
    }
    try:
        result = {"name": name}
        for route, script in (("token", "token.lua"), ("me", "me.lua")):
            result[route] = wrk(url, script, env, args)
        return result
    finally:
        os.unlink(listing.name)


def wrk(url: str, script: str, env: dict, args: argparse.Namespace) -> dict:
    command = ["taskset", "-c", "1", "wrk", "-t1", f"-c{args.connections}"]
    command += [f"-d{args.duration}s", "-s", str(BENCH / script), url]
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    stats = json.loads(output.strip().splitlines()[-1])
    stats["rps"] = stats["requests"] / stats["seconds"]
    return stats


def measure_login(args: argparse.Namespace) -> dict:
    """POST /login under load, and the password hash alone, which dominates it."""
    users = Users()
    users.add(DEMO["email"], DEMO["password"])
    started = time.perf_counter()
    for _ in range(5):
        users.authenticate(DEMO["email"], DEMO["password"])
    hash_ms = (time.perf_counter() - started) / 5 * 1000
    command, env, port = our_server(args.servers[0], 0, Path(os.devnull))
    with running(command, env, port):
        login = wrk(f"http://127.0.0.1:{port}", "login.lua", env | {"BENCH_DIR": str(BENCH)}, args)
    return {"login": login, "hash_check_ms": hash_ms}


def measure_memory(sizes: list[int], redis_url: str | None) -> list[dict]:
    """Bytes per live session in the memory store (tracemalloc), and in Redis (INFO memory)."""
    rows = []
    now = int(time.time())
    for n in [size for size in sizes if size]:
        tracemalloc.start()
        baseline = tracemalloc.get_traced_memory()[0]
        store, families, jtis = MemoryStore(), [], []
        for _ in range(n):  # ids made here, as each login makes its own
            family, jti = new_id(), new_id()
            store.start(family, jti, now + 86_400)
            families.append(family)
            jtis.append(jti)
        lists = sys.getsizeof(families) + sys.getsizeof(jtis)  # the bench's, not the store's
        per_session = (tracemalloc.get_traced_memory()[0] - baseline - lists) / n
        for _ in range(3):  # three rotations of every session: memory must not grow
            for index, family in enumerate(families):
                store.rotate(family, jtis[index], new_jti := new_id())
                jtis[index] = new_jti
        after_rotations = (tracemalloc.get_traced_memory()[0] - baseline - lists) / n
        tracemalloc.stop()
        row = {"sessions": n, "memory_store": per_session, "after_3_rotations": after_rotations}
        if redis_url:
            row["redis_store"] = redis_bytes_per_session(redis_url, n, now + 86_400)
        rows.append(row)
    return rows


def redis_bytes_per_session(url: str, n: int, expires_at: int) -> float:
    import redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    before = client.info("memory")["used_memory"]
    store = RedisStore(client)
    for _ in range(n):
        store.start(new_id(), new_id(), expires_at)
    used = client.info("memory")["used_memory"] - before
    client.flushdb()
    return used / n


class running:
    """Start a server process, wait until it listens (and wrote `ready`), stop it after."""

    def __init__(self, command, env, port, ready=None, timeout=60):
        self.command, self.env, self.port, self.ready, self.timeout = (
            command,
            env,
            port,
            ready,
            timeout,
        )

    def __enter__(self):
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            self.command, env=self.env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                tail = self.log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"{self.command} exited with {self.process.returncode}:\n{tail}")
            if (self.ready is None or self.ready.exists()) and listening(self.port):
                return self
            time.sleep(0.1)
        raise RuntimeError(f"{self.command} did not start in {self.timeout} s")

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


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


def write_results(results: dict, args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "smoke" if args.smoke else "results"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out / f"{stem}.md").write_text(table)
    print(table)
    if len(args.sessions) > 1:
        plot(results, out / "token_rps.png")


def errors(run: dict) -> int:
    return sum(
        run[route][kind] for route in ("token", "me") for kind in ("non_2xx", "socket_errors")
    )


def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}; "
        f"server on core 0, wrk on core 1, {results['connections']} connections.",
        "",
        "| server | live sessions | POST /token req/s | p50 ms | p99 ms | GET /me req/s "
        "| p50 ms | p99 ms | /token vs first row | RSS per session |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = results["runs"]
    baseline = runs[0]["token"]["rps"] if runs else 1
    for run in runs:
        token, me = run["token"], run["me"]
        rss = f"{run['rss_per_session']:.0f} B" if run.get("rss_per_session") else ""
        sessions = "as running" if run["sessions"] is None else f"{run['sessions']:,}"
        lines.append(
            f"| {run['name']} | {sessions} | {token['rps']:.0f} | {token['p50_ms']:.2f} "
            f"| {token['p99_ms']:.2f} | {me['rps']:.0f} | {me['p50_ms']:.2f} "
            f"| {me['p99_ms']:.2f} | {token['rps'] / baseline:.2f}x | {rss} |"
            + (f" **{errors(run)} errors**" if errors(run) else "")
        )
    if results.get("login"):
        login, run = results["login"], results["login"]["login"]
        lines += [
            "",
            f"POST /login: {run['rps']:.1f} req/s, p50 {run['p50_ms']:.0f} ms,"
            f" p99 {run['p99_ms']:.0f} ms; one password check (scrypt N=2^15, r=8,"
            f" p=3) costs {login['hash_check_ms']:.0f} ms, which bounds it.",
        ]
    if results["memory"]:
        lines += [
            "",
            "| live sessions | memory store, B/session (tracemalloc) "
            "| after 3 rotations each | Redis store, B/session (INFO memory) |",
            "|---|---|---|---|",
        ]
        for row in results["memory"]:
            redis_cell = f"{row['redis_store']:.0f}" if "redis_store" in row else "not measured"
            lines.append(
                f"| {row['sessions']:,} | {row['memory_store']:.0f} "
                f"| {row['after_3_rotations']:.0f} | {redis_cell} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    by_name: dict[str, list[tuple[int, float]]] = {}
    for run in results["runs"]:
        if run["sessions"] is not None:
            by_name.setdefault(run["name"], []).append((run["sessions"], run["token"]["rps"]))
    for name, points in by_name.items():
        points.sort()
        axes.plot([max(n, 1) for n, _ in points], [rps for _, rps in points], "o-", label=name)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("live sessions (0 drawn at 1)")
    axes.set_ylabel("POST /token req/s, one core")
    axes.set_title("Refresh throughput against live sessions")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
