"""Slow clients: each request body is read in full, under a deadline, before a thread is given.

Under granian's WSGI interface the app runs on a blocking thread as soon as a request's head
is in, and that thread then waits for the body: a client sending a byte a second holds it for
as long as it likes (OWASP Denial of Service Cheat Sheet, slow HTTP POST; CWE-400). Served
over RSGI instead (``granian --interface rsgi``, which finds the app's ``__rsgi__``), the body
is awaited on the event loop, which costs no thread, and only a request whose body is in
reaches the Flask app, on a pool of THREADS threads. A body not in after BODY_TIMEOUT gets the
app's 408, and the connection is closed. ``python server.py`` does not use this.
"""

import asyncio
import io
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flask import Flask

from errors import APIError
from web import MAX_BODY

BODY_TIMEOUT = 10.0  # seconds for a whole body: ours are small JSON, 64 KiB at most
THREADS = 8  # per worker: the WSGI app waits on Redis; more threads overlap those waits
HTTP_VERSIONS = {"1": "HTTP/1.0", "1.1": "HTTP/1.1", "2": "HTTP/2"}
WSGI_BASE = {
    "GATEWAY_INTERFACE": "CGI/1.1",
    "SCRIPT_NAME": "",
    "SERVER_SOFTWARE": "Granian",
    "wsgi.errors": sys.stderr,
    "wsgi.input_terminated": True,  # the body ends where wsgi.input does (Werkzeug reads it)
    "wsgi.multiprocess": False,
    "wsgi.multithread": True,
    "wsgi.run_once": False,
    "wsgi.version": (1, 0),
}


def init_app(app: Flask) -> None:
    """Let granian's RSGI interface serve the app, reading bodies under a deadline."""
    app.__rsgi__ = RSGIServer(app)  # type: ignore[attr-defined]


class TimedOutBody(io.RawIOBase):
    """The body of a request whose body did not arrive in time: reading it is a 408."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        # RFC 9110 §15.5.9: 408, and the server closes the connection.
        message = f"The request body did not arrive within {BODY_TIMEOUT:.0f} seconds."
        raise APIError(408, "request_timeout", message)


class CutOffBody(io.RawIOBase):
    """The body of a request whose client stopped sending it: reading it fails, as reading
    a broken body does under any server (web.read_body answers 400)."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        raise ConnectionResetError("The client stopped sending the request body.")


class RSGIServer:
    """An RSGI app that reads the body on the event loop, then runs the WSGI app on a thread."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.pool = ThreadPoolExecutor(THREADS, thread_name_prefix="wsgi")

    async def __call__(self, scope: Any, proto: Any) -> None:
        # Imported here: settings tells that granian serves by finding its modules loaded.
        from granian.rsgi import ProtocolClosed

        if scope.proto != "http":  # a WebSocket: the service has none
            return
        body: bytes | io.RawIOBase
        try:
            body, complete = await read_body(scope.headers, proto, MAX_BODY)
        except TimeoutError:
            body, complete = TimedOutBody(), False
        except ProtocolClosed:  # the client stopped sending before its body was in
            body, complete = CutOffBody(), False
        loop = asyncio.get_running_loop()
        status, headers, content = await loop.run_in_executor(self.pool, self.run, scope, body)
        if not complete:  # what is left of the body must not be read as the next request
            headers.append(("Connection", "close"))
        proto.response_bytes(status, headers, content)

    def run(
        self, scope: Any, body: bytes | io.RawIOBase
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Call the WSGI app with the body read, or one that fails when read; return its whole
        answer."""
        environ = wsgi_environ(scope)
        environ["wsgi.input"] = (
            io.BytesIO(body) if isinstance(body, bytes) else io.BufferedReader(body)
        )
        started: list[Any] = []
        written: list[bytes] = []  # PEP 3333's write(), which Flask never calls

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None, /
        ) -> Callable[[bytes], object]:
            started[:] = [int(status.split(" ", 1)[0]), list(headers)]
            return written.append

        result: Iterable[bytes] = self.app(environ, start_response)
        try:
            content = b"".join([*written, *result])
        finally:
            if close := getattr(result, "close", None):
                close()
        return started[0], started[1], content


async def read_body(headers: Any, proto: Any, limit: int) -> tuple[bytes, bool]:
    """Return the body, or its first limit + 1 bytes, and whether it was read to its end.

    A Content-Length over the limit is not read at all: the app answers it with 413.
    """
    chunked, length = "transfer-encoding" in headers, headers.get("content-length")
    if not chunked and length is None:
        return b"", True  # no body
    if not chunked and int(length) > limit:  # hyper has refused a Content-Length not a number
        return b"", False
    async with asyncio.timeout(BODY_TIMEOUT):
        if not chunked:
            return await proto(), True  # hyper stops at Content-Length
        chunks, size = [], 0
        async for chunk in proto:
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:  # enough to tell that it is over the bound
                return b"".join(chunks)[: limit + 1], False
        return b"".join(chunks), True


def wsgi_environ(scope: Any) -> dict[str, Any]:
    """The WSGI environ of an RSGI scope, as granian's WSGI interface builds it (PEP 3333)."""
    server_host, _, server_port = scope.server.rpartition(":")
    environ = WSGI_BASE | {
        "SERVER_PROTOCOL": HTTP_VERSIONS.get(scope.http_version, "HTTP/1.1"),
        "SERVER_NAME": server_host.strip("[]"),
        "SERVER_PORT": server_port,
        "REMOTE_ADDR": scope.client.rpartition(":")[0].strip("[]"),  # [::1]:port too
        "REQUEST_METHOD": scope.method,
        # RSGI gives the path percent-decoded as UTF-8; WSGI wants its bytes as Latin-1.
        "PATH_INFO": scope.path.encode("utf-8").decode("latin-1"),
        "QUERY_STRING": scope.query_string,
        "wsgi.url_scheme": scope.scheme,
    }
    for name, value in scope.headers.items():
        if "_" in name:
            # X_Forwarded_For would become HTTP_X_FORWARDED_FOR, the header a trusted proxy
            # sets: dropped, as gunicorn and nginx drop them (CWE-444).
            continue
        if name == "content-type":
            key = "CONTENT_TYPE"
        elif name == "content-length":
            key = "CONTENT_LENGTH"
        else:
            key = "HTTP_" + name.upper().replace("-", "_")
        if key in environ:  # a repeated header: one value, as granian joins them
            environ[key] += (";" if key == "HTTP_COOKIE" else ",") + value
        else:
            environ[key] = value
    if "HTTP_HOST" not in environ and scope.authority:
        environ["HTTP_HOST"] = scope.authority  # HTTP/2's :authority
    return environ
