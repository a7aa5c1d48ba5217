"""Slow clients against the production command, exactly as the docs give it.

OWASP Denial of Service Cheat Sheet (slow HTTP POST) and CWE-400: a client that sends a
request's head and then its body a byte a second must not hold what other requests need.
Sixty-four of them trickle at once; /healthz and /login must still answer within a few
seconds, and each trickling body must end with 408 or a closed connection.
"""

import json
import re
import selectors
import shlex
import socket
import threading
import time

import pytest

from server import create_app
from slow_clients import RSGIServer, wsgi_environ

from .conftest import DEMO, GRANIAN, ROOT, TEST_CONFIG, call, granian

CLIENTS = 64
FEW_SECONDS = 3.0  # what /healthz and /login may take while the clients trickle
BODY_ENDS_WITHIN = 20.0  # seconds from its head to a 408 or a closed connection
TRICKLE_ROUNDS = 30  # a byte a second to each client: the attack stops by itself
SLOW_BODY = (
    b"POST /token HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: 60000\r\n\r\n{"
)
SLOW_HEAD = b"POST /token HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


def documented_command():
    """The `granian ...` command of the docs (README.md or docs/), its lines joined."""
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if found := re.search(r"^granian (?:.*\\\n)*.*$", page.read_text(), re.MULTILINE):
            return shlex.split(found.group(0).replace("\\\n", " "))
    raise AssertionError("no `granian ...` command in README.md or docs/")


def test_the_production_app_reads_bodies_before_it_takes_a_thread():
    # granian --interface rsgi serves the app's __rsgi__, which slow_clients.init_app sets.
    assert isinstance(getattr(create_app(TEST_CONFIG), "__rsgi__", None), RSGIServer)


def test_the_suites_production_command_is_the_documented_one():
    documented = documented_command()
    documented[documented.index("--port") + 1] = "4321"
    assert [GRANIAN, *documented[1:]] == granian(4321)


class Trickle:
    """Clients that send `head`, then a byte a second, on their own thread, for a bounded time."""

    def __init__(self, url, head, count=CLIENTS):
        host, port = url.removeprefix("http://").split(":")
        self.selector = selectors.DefaultSelector()
        self.started = time.monotonic()
        self.ended = {}  # client -> (seconds after its head, the status line or "closed")
        self.clients = []
        for _ in range(count):
            client = socket.create_connection((host, int(port)), timeout=5)
            client.sendall(head)
            client.setblocking(False)
            self.selector.register(client, selectors.EVENT_READ)
            self.clients.append(client)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        for second in range(1, TRICKLE_ROUNDS + 1):
            for client in self.open():
                try:
                    client.send(b" ")  # JSON allows whitespace: the body stays well formed
                except OSError:  # the server closed it
                    self.end(client, "closed")
            # Until the next byte is due, read what the server answers.
            while (left := self.started + second - time.monotonic()) > 0 and self.open():
                for key, _ in self.selector.select(timeout=left):
                    self.read(key.fileobj)
            if self.stop.is_set() or not self.open():
                return

    def open(self):
        return [client for client in self.clients if client not in self.ended]

    def read(self, client):
        try:
            data = client.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.end(client, data.split(b"\r\n")[0].decode() if data else "closed")

    def end(self, client, how):
        if client not in self.ended:
            self.ended[client] = (time.monotonic() - self.started, how)
            self.selector.unregister(client)

    def close(self):
        self.stop.set()
        self.thread.join(timeout=TRICKLE_ROUNDS + 5)
        for client in self.clients:
            client.close()
        self.selector.close()


@pytest.fixture
def production(shared_cluster):
    url, _ = shared_cluster()
    return url


def answers_quickly(url, method, path, body=None):
    started = time.monotonic()
    status, _, _ = call(url, method, path, body)
    return status, time.monotonic() - started


def assert_service_answers(url):
    status, seconds = answers_quickly(url, "GET", "/healthz")
    assert (status, seconds < FEW_SECONDS) == (200, True), seconds
    status, seconds = answers_quickly(url, "POST", "/login", DEMO)
    assert (status, seconds < FEW_SECONDS) == (200, True), seconds


@pytest.mark.parametrize("head", [SLOW_BODY, SLOW_HEAD], ids=["slow-body", "slow-headers"])
def test_slow_clients_do_not_stop_the_service(production, head):
    attack = Trickle(production, head)
    try:
        threading.Event().wait(2.0)  # two bytes each: every client is past its head
        assert len(attack.open()) == CLIENTS  # the attack is on while the service answers
        assert_service_answers(production)
    finally:
        attack.close()


def exchange(url, pieces, pause=0.0):
    """Send `pieces` on a fresh connection, `pause` seconds apart; return all that comes back."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=BODY_ENDS_WITHIN) as client:
        for n, piece in enumerate(pieces):
            if n:
                threading.Event().wait(pause)  # a slow but honest client
            client.sendall(piece)
        return b"".join(iter(lambda: client.recv(4096), b""))


def test_a_slow_body_ends_with_408_or_a_closed_connection(production):
    attack = Trickle(production, SLOW_BODY)
    try:
        # One more that stops after its first byte, read to its end: the whole 408.
        answer = exchange(production, [SLOW_BODY])
        attack.thread.join(timeout=BODY_ENDS_WITHIN + 5)
        endings = list(attack.ended.values())
    finally:
        attack.close()
    assert len(endings) == CLIENTS
    assert {how for _, how in endings} <= {"HTTP/1.1 408 Request Timeout", "closed"}
    assert max(seconds for seconds, _ in endings) < BODY_ENDS_WITHIN
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"\r\nconnection: close" in head.lower()
    assert json.loads(body) == {
        "error": "request_timeout",
        "message": "The request body did not arrive within 10 seconds.",
    }
    assert_service_answers(production)


LOGIN = json.dumps(DEMO).encode()
LOGIN_HEAD = (
    b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\n"
)


EXACTLY_64_KIB = b"{" + b" " * (64 * 1024 - 2) + b"}"


def chunked(body):
    return b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


@pytest.mark.parametrize(
    ("pieces", "status"),
    [
        ([LOGIN_HEAD + b"Content-Length: %d\r\n\r\n" % len(LOGIN), LOGIN[:9], LOGIN[9:]], 200),
        ([LOGIN_HEAD + chunked(LOGIN)], 200),
        ([LOGIN_HEAD + b"Content-Length: 70000\r\n\r\n{"], 413),  # not waited for
        ([LOGIN_HEAD + chunked(b"{" + b" " * 70_000 + b"}")], 413),
        ([LOGIN_HEAD + b"Content-Length: 65536\r\n\r\n" + EXACTLY_64_KIB], 400),  # {}: read
        ([LOGIN_HEAD + chunked(EXACTLY_64_KIB)], 400),
        ([LOGIN_HEAD + chunked(EXACTLY_64_KIB + b" ")], 413),
        (
            [LOGIN_HEAD.replace(b"POST /login", b"GET /healthz") + chunked(EXACTLY_64_KIB + b" ")],
            413,
        ),
    ],
    ids=[
        "in-pieces",
        "chunked",
        "length-over-64-KiB",
        "chunked-over-64-KiB",
        "length-of-64-KiB",
        "chunked-of-64-KiB",
        "chunked-of-64-KiB-and-1",
        "chunked-of-64-KiB-and-1-to-a-route-of-no-body",
    ],  # fmt: skip
)
def test_a_body_in_time_is_served_and_one_too_large_refused(production, pieces, status):
    started = time.monotonic()
    answer = exchange(production, pieces, pause=0.5)
    assert answer.startswith(b"HTTP/1.1 %d " % status)
    assert time.monotonic() - started < FEW_SECONDS


class Headers(dict):
    """RSGI's headers: a mapping of lower-case names."""


def test_header_names_with_underscores_never_pass_for_a_proxys_headers():
    # CWE-444: X_Forwarded_For must not become the HTTP_X_FORWARDED_FOR a trusted proxy sets.
    scope = type("Scope", (), {
        "server": "127.0.0.1:3000", "client": "203.0.113.9:5000", "http_version": "1.1",
        "method": "GET", "path": "/me", "query_string": "", "scheme": "http",
        "authority": None,
        "headers": Headers({"host": "x", "x-forwarded-for": "198.51.100.1",
                            "x_forwarded_for": "10.0.0.1", "content_type": "text/html"}),
    })()  # fmt: skip
    environ = wsgi_environ(scope)
    assert environ["HTTP_X_FORWARDED_FOR"] == "198.51.100.1"
    assert "CONTENT_TYPE" not in environ and "HTTP_CONTENT_TYPE" not in environ
    assert environ["REMOTE_ADDR"] == "203.0.113.9"
