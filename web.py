"""Request plumbing every route shares: the JSON body, text fields, headers, the audit line.

Skip this file on a first read. It also serves ``/healthz`` and ``/openapi.json``, and runs
the development server (``python server.py``).
"""

import errno
import functools
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import ClientDisconnected
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.sansio.response import Response as SansIOResponse
from werkzeug.serving import WSGIRequestHandler, get_sockaddr, select_address_family
from werkzeug.wsgi import get_content_length

from errors import APIError, body_too_large, error_body, error_code, register_error_handlers
from settings import ConfigError
from store import get_store

MAX_BODY = 64 * 1024
BODY = "web.body"  # the WSGI environ's key of the body, once read
OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")
# The audit trail: bare JSON lines on stderr, apart from Flask's log, so tools can parse them.
# Written to the stream itself: a logging record costs five times the line (bench/README.md).
AUDIT_LOCK = threading.Lock()  # one whole line at a time, whichever thread writes
# Who hears of each audit line besides stderr (on_audit): how a module counts events without a
# branch in the routes (metrics.py). A plain list: a blinker signal cost ten times the call.
AUDIT_LISTENERS = "web.audit_listeners"

bp = Blueprint("web", __name__)


def init_app(app: Flask) -> None:
    """Bound bodies, trust the proxies the settings name, and answer every error as JSON."""
    # One byte over the bound: Werkzeug refuses reading past its limit even where the body
    # ends there, and read_body reads that byte to tell a body of 64 KiB from a longer one.
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY + 1
    app.before_request(refuse_large_bodies)
    app.json = CompactJSON(app)  # jsonify, a third faster
    # Flask asks of every view and hook, on every request, whether it is a coroutine, and the
    # answer never changes: asked once per function, it is 5% of a GET /me (bench/README.md).
    app.ensure_sync = functools.cache(app.ensure_sync)  # type: ignore[method-assign]
    # Inside ProxyFix, so that it sees the scheme the proxies name.
    app.wsgi_app = CommonHeaders(app.wsgi_app)  # type: ignore[method-assign]
    if hops := app.config["TRUSTED_PROXIES"]:
        # Behind a TLS proxy, the client's address and scheme come from its X-Forwarded-*
        # headers, which are trusted only from that many proxies (Werkzeug ProxyFix).
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops
        )
    register_error_handlers(app)


def refuse_large_bodies() -> None:
    """Refuse a body over MAX_BODY on any route, before anything else is checked: a route
    that reads no body would otherwise answer as if it had none. A chunked body has no
    length to tell, so it is read here (read_body keeps it for the route)."""
    environ = request.environ
    if (get_content_length(environ) or 0) > MAX_BODY:  # request.content_length, from the environ
        raise body_too_large()
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        read_body()


def json_body() -> dict[str, Any]:
    """Return the JSON object in the request body (each route reads it once)."""
    if not request.is_json:
        raise APIError(
            415, "unsupported_media_type", "Send a JSON body with 'Content-Type: application/json'."
        )
    try:
        # RFC 8259 §8.1: JSON between systems is UTF-8; json.loads alone would take UTF-16 too.
        body = JSON_BODY.decode(read_body().decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested beyond reason
        raise APIError(400, "invalid_json", "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise APIError(400, "invalid_body", "The request body must be a JSON object.")
    return body


def not_json(constant: str) -> None:
    """Refuse NaN, Infinity and -Infinity, which Python's parser takes and RFC 8259 §6 does not."""
    raise ValueError(f"{constant} is not JSON")


# One decoder for every body: json.loads with an option builds a decoder on every call.
JSON_BODY = json.JSONDecoder(parse_constant=not_json)


def form_body() -> MultiDict[str, str]:
    """Return the form in a form-urlencoded body, bounded as every body is; else empty."""
    if request.mimetype != "application/x-www-form-urlencoded":
        return MultiDict()
    try:
        return MultiDict(parse_qsl(read_body().decode("utf-8"), keep_blank_values=True))
    except ValueError:  # not UTF-8
        raise APIError(400, "invalid_request", "The form body is not valid text.") from None


def read_body() -> bytes:
    """Read the body, refusing one over MAX_BODY however it is framed (chunked included).

    A Content-Length over it was refused before the route (refuse_large_bodies), but a
    chunked body has none: reading one byte past the bound tells a body that fits from one
    that was cut.
    """
    environ = request.environ
    if (body := environ.get(BODY)) is not None:
        return body  # read before the route (refuse_large_bodies)
    # A server that ends the body itself (granian always, the development server a chunked
    # one) hands over its own stream: this loop bounds it, as the LimitedStream Werkzeug would
    # wrap it in does, for a fraction of the cost. Otherwise Werkzeug's stream stops at the
    # Content-Length.
    terminated = environ.get("wsgi.input_terminated")
    stream, chunks, size = environ["wsgi.input"] if terminated else request.stream, [], 0
    try:
        while size <= MAX_BODY:
            chunk = stream.read(MAX_BODY + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except (OSError, ValueError):  # the chunked framing broke, or the client went: as Werkzeug
        raise ClientDisconnected() from None
    if size > MAX_BODY:
        raise body_too_large()
    if size < (get_content_length(environ) or 0):
        # RFC 9112 §8: a body that ends before its Content-Length is incomplete, not a body.
        raise ClientDisconnected()
    body = environ[BODY] = b"".join(chunks)
    return body


def text_field(body: dict[str, Any], name: str, max_length: int = MAX_BODY) -> str:
    """Return the body's string field ``name``: present, valid Unicode and not too long."""
    value = body.get(name)
    if not isinstance(value, str):
        raise APIError(400, "invalid_field", f"The field '{name}' must be a string.")
    if len(value) > max_length:
        message = f"The field '{name}' is longer than {max_length} characters."
        raise APIError(400, "invalid_field", message)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON can carry lone surrogates, which are not text
        raise APIError(400, "invalid_field", f"The field '{name}' is not valid text.") from None
    return value


class CommonHeaders:
    """Headers every answer carries, whatever route or error produced it: added to the list
    the app hands the server (a WSGI middleware), where an after_request hook would set them
    one at a time through Werkzeug's Headers on every answer."""

    # OWASP HTTP Security Response Headers Cheat Sheet: never let a browser guess the type.
    NOSNIFF = ("X-Content-Type-Options", "nosniff")
    # RFC 6749 §5.1 and RFC 9111 §5.2.2.5: tokens and personal data are never cached; routes
    # that may be cached (the JWKS, the page's files) say so themselves.
    NO_STORE = ("Cache-Control", "no-store")
    # RFC 6797 §7.1 and ASVS 5.0 V3.4.1: a browser that reached us over HTTPS keeps to it for
    # a year; §7.2: never sent over plain HTTP, where an attacker could strip it.
    HSTS = ("Strict-Transport-Security", "max-age=31536000; includeSubDomains")

    def __init__(self, wsgi_app: Callable[..., Any]) -> None:
        self.wsgi_app = wsgi_app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        secure = environ["wsgi.url_scheme"] in ("https", "wss")  # request.is_secure

        def with_headers(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            names = {name.lower() for name, _ in headers}
            if status.startswith("204"):  # RFC 9110 §15.3.5: no content, so no type
                headers = [
                    (name, value) for name, value in headers if name.lower() != "content-type"
                ]
            if "x-content-type-options" not in names:
                headers.append(self.NOSNIFF)
            if "cache-control" not in names:
                headers.append(self.NO_STORE)
            if secure:
                headers.append(self.HSTS)
            return start_response(status, headers, *exc_info)

        return self.wsgi_app(environ, with_headers)


class CompactJSON(DefaultJSONProvider):
    """Flask's JSON, with the encoder of its answers built once: jsonify builds one on every
    call. The same bytes: compact, keys sorted, ASCII; indented in debug mode, as Flask's."""

    def __init__(self, app: Flask) -> None:
        super().__init__(app)
        self.encoder = json.JSONEncoder(
            default=self.default,
            ensure_ascii=self.ensure_ascii,
            sort_keys=self.sort_keys,
            separators=(",", ":"),
        )

    def response(self, *args: Any, **kwargs: Any) -> SansIOResponse:  # as Flask's
        if self._app.debug:
            return super().response(*args, **kwargs)
        body = self.encoder.encode(self._prepare_response_obj(args, kwargs))
        return self._app.response_class(body + "\n", mimetype=self.mimetype)


def client_address() -> str:
    """Return the client's address (behind trusted proxies, the one they name)."""
    return request.remote_addr or ""


def audit(event: str, **fields: str) -> None:
    """Log one JSON line per security event: ids and prefixes, never a token or password."""
    ip, pid = request.remote_addr, os.getpid()
    record = {"time": round(time.time(), 3), "audit": event, "ip": ip, "pid": pid, **fields}
    line = json.dumps(record) + "\n"
    with AUDIT_LOCK:
        sys.stderr.write(line)  # stderr is line-buffered: the line is out before the answer
    for listener in current_app.extensions.get(AUDIT_LISTENERS, ()):
        listener(event, fields)


def on_audit(app: Flask, listener: Callable[[str, Mapping[str, str]], None]) -> None:
    """Call ``listener(event, fields)`` after each audit line that ``app`` writes."""
    app.extensions.setdefault(AUDIT_LISTENERS, []).append(listener)


@bp.get("/healthz")
def healthz() -> Response:
    """Tell a load balancer whether this instance can serve: its store must answer."""
    store = get_store()
    store.ping()  # a Redis error becomes the 503 of store_unavailable
    return jsonify(status="ok", store=store.kind)


@bp.get("/openapi.json")
def openapi() -> Response:
    """Serve this service's OpenAPI description, openapi.yaml, as JSON."""
    return jsonify(openapi_description())


@functools.cache
def openapi_description() -> dict[str, Any]:
    """Return openapi.yaml, read once per process when first served."""
    import yaml  # here, with the first reading: a process that never serves it never loads it

    return yaml.safe_load(OPENAPI_PATH.read_text())


class QuietRequestHandler(WSGIRequestHandler):
    """Werkzeug's request handler, telling an attacker less: no versions, no whole ids."""

    def version_string(self) -> str:
        # OWASP HTTP Headers Cheat Sheet: a version only helps an attacker pick an exploit.
        return "jwt-refresh-service"

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        """Answer a request too broken to reach the app in the JSON shape, never echoing it."""
        reason = self.responses.get(code, ("Error",))[0]
        body = json.dumps(error_body(error_code(reason), reason))
        self.send_response(code, reason)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body.encode())

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # A session id in a path is logged as a prefix only, as the audit lines do.
        if hasattr(self, "path"):  # not set when the request line itself was broken
            self.path = re.sub(r"(/sessions/[^/?]{8})[^/?]*", r"\1...", self.path)
        super().log_request(code, size)


def page_address(host: str, port: int) -> str:
    """Return the URL to open for a server on host and port: an address of every interface
    is this machine's, and an IPv6 address goes in brackets (RFC 3986 §3.2.2)."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"


def serve(create_app: Any) -> None:
    """Serve with Flask's own threaded server, debug off, where the settings say."""
    try:
        app = create_app()
    except ConfigError as error:
        sys.exit(f"error: {error.message}")
    host, port = app.config["HOST"], app.config["PORT"]
    family = select_address_family(host, port)  # as Werkzeug's server will bind
    try:  # say so plainly before anything else, rather than after an address to open
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's does
            # Bound, never listening: a client that connects meanwhile is refused and tries
            # again, rather than accepted here and reset when this socket closes.
            probe.bind(get_sockaddr(host, port, family))
    except OSError as error:
        # A name that does not resolve, or an address that is not this machine's: HOST.
        not_here = isinstance(error, socket.gaierror) or error.errno == errno.EADDRNOTAVAIL
        fix = "set HOST to an address of this machine" if not_here else "set PORT to another"
        sys.exit(f"error: cannot listen on {host}:{port} ({error.strerror or error}); {fix}.")
    app.logger.info("Open %s for the demo page.", page_address(host, port))
    app.run(host=host, port=port, debug=False, threaded=True, request_handler=QuietRequestHandler)
