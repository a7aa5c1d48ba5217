"""Metrics: what an operator watches, at ``GET /metrics`` in Prometheus's text format.

Skip this file on a first read. The counts come from the audit line (``web.on_audit``) and
from request hooks, never from a branch in the routes. No label holds anything a client
chose (an id, an address, a path, a header), so the number of series is fixed whatever
arrives. Under granian or gunicorn every worker writes its counts to files in one directory
(prometheus_client's multiprocess mode), and a scrape, whichever worker answers it, adds
them all up. docs/metrics.md lists every metric and how to scrape it.
"""

import atexit
import functools
import multiprocessing.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request
from flask.typing import ResponseReturnValue
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)
from werkzeug.routing import Map, Rule

from auth import bearer_token, same_text
from errors import APIError
from settings import ConfigError
from web import on_audit

PREFIX = "jwt_refresh"  # Prometheus naming: one prefix for the service's metrics
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The classes of a final answer: Flask never sends a 1xx one.
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")
UNMATCHED = "unmatched"  # the route label of every path that matches no route
STARTED = "metrics.started"  # the WSGI environ's key of when the request began
OTHER = "other"  # the label of a method, or of a reason, outside the known ones
LOGIN_OUTCOMES = ("succeeded", "failed", "throttled", "busy")
REFRESH_OUTCOMES = (
    "rotated", "retried", "reuse", "invalid_token", "session_ended", "account_removed",
)  # fmt: skip
# Every reason a session ends for, as the audit line names it; "cap" is session_evicted.
END_REASONS = (
    "logout_local", "logout_others", "logout_global", "reuse", "ended_by_user", "cap",
    "account_removed", "password_changed",
)  # fmt: skip
SCRAPE = "metrics.metrics"  # the endpoint of /metrics, whose requests are not counted
# The folder for the workers' files when PROMETHEUS_MULTIPROC_DIR names none: one per run
# of the server's main process, in the temporary folder.
RUN_FOLDER = "jwt-refresh-metrics-"

bp = Blueprint("metrics", __name__)
# prometheus_client asks for the process's id on every increment, to notice a fork, and each
# os.getpid() is a system call: four of them a /token. The id is kept, and forgotten in a
# forked child, which asks again.
process_id = functools.cache(os.getpid)
os.register_at_fork(after_in_child=process_id.cache_clear)


class Metrics:
    """The app's counters and histogram, and the registry a scrape reads."""

    def __init__(self, directory: str | None) -> None:
        self.directory = directory  # the workers' files, or None for one process
        self.registry = CollectorRegistry()
        self._series: dict[tuple[Any, tuple[str, ...]], Any] = {}
        # (route, method, status): the two series of such a request (answered). Bounded: the
        # routes and statuses are the app's, and every method outside METHODS is OTHER.
        self._answered: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.declared = False  # every request series created (declare), at the first request

        def counter(name: str, summary: str, *labels: str) -> Counter:
            return Counter(name, summary, labels, namespace=PREFIX, registry=self.registry)

        self.logins = counter("logins", "Login attempts by outcome.", "outcome")
        self.refreshes = counter("refreshes", "Refresh-token trades by outcome.", "outcome")
        self.sessions_ended = counter("sessions_ended", "Sessions ended, by reason.", "reason")
        self.introspections = counter("introspections", "Introspection answers.", "active")
        self.clients_refused = counter("introspection_clients_refused", "Refused clients.")
        self.store_errors = counter("store_errors", "Requests refused as the store failed.")
        self.requests = counter(
            "http_requests", "Requests by route template, method and status class.",
            "route", "method", "status",
        )  # fmt: skip
        self.latency = Histogram(
            "http_request_duration_seconds", "Time to answer a request, by route template.",
            ["route"], namespace=PREFIX, registry=self.registry,
        )  # fmt: skip
        # Every outcome and reason starts at 0, so that rate() and alerts see the first one.
        for metric, labels in [
            (self.logins, LOGIN_OUTCOMES),
            (self.refreshes, REFRESH_OUTCOMES),
            (self.sessions_ended, END_REASONS),
            (self.introspections, ("true", "false")),
        ]:
            for label in labels:
                self.series(metric, label)

    def series(self, metric: Any, *labels: str) -> Any:
        """Return the series of ``metric`` with these labels, each looked up once and kept:
        labels() costs more than inc(). The labels are from fixed sets, so this is bounded."""
        key = (metric, labels)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = metric.labels(*labels)
        return child

    def exposition(self) -> bytes:
        """Return the text a scrape gets: this process's counts, or every worker's summed."""
        if self.directory is None:
            return generate_latest(self.registry)
        # prometheus_client's multiprocess docs: a registry of its own for each scrape.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.directory)
        return generate_latest(registry)

    def count_audited(self, event: str, fields: Mapping[str, str]) -> None:
        """Count one audit line (web.on_audit): the login, refresh and session events."""
        reason = fields.get("reason", "")
        match event:
            case "login_succeeded" | "login_failed" | "login_throttled":
                self.series(self.logins, event.removeprefix("login_")).inc()
            case "refreshed":
                self.series(self.refreshes, "rotated").inc()
            case "refresh_replayed":
                self.series(self.refreshes, "retried").inc()
            case "refresh_refused":
                self.series(self.refreshes, known(reason, REFRESH_OUTCOMES)).inc()
                if reason == "account_removed":  # the session ends with its account
                    self.series(self.sessions_ended, "account_removed").inc()
            case "session_ended":
                self.series(self.sessions_ended, known(reason, END_REASONS)).inc()
                if reason == "reuse":  # only /token ends a session for reuse
                    self.series(self.refreshes, "reuse").inc()
            case "session_evicted":
                self.series(self.sessions_ended, "cap").inc()
            case "password_changed":  # one line for all the sessions it ended: ended=<count>
                if (ended := str(fields.get("ended", ""))).isdigit():
                    self.series(self.sessions_ended, "password_changed").inc(int(ended))
            case "introspection_client_refused":
                self.clients_refused.inc()

    def timed(self, wsgi_app: Callable[..., Any], url_map: Map) -> Callable[..., Any]:
        """Wrap the WSGI app to note when each request began, for the latency histogram."""

        def timed_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            environ[STARTED] = time.perf_counter()
            if not self.declared:  # the process's first request: every route is known by now
                self.declare(url_map)
            return wsgi_app(environ, start_response)

        return timed_app

    def declare(self, url_map: Map) -> None:
        """Create, at 0, every series a request can count: each route with its methods, and
        the unmatched with every method, by status class. Their number never changes after,
        whatever arrives."""
        for rule in url_map.iter_rules():
            if rule.endpoint != SCRAPE:
                self.declare_route(rule.rule, rule.methods or set())
        self.declare_route(UNMATCHED, {*METHODS, OTHER})
        self.declared = True

    def declare_route(self, route: str, methods: set[str]) -> None:
        self.series(self.latency, route)
        for method in methods:
            for status in STATUS_CLASSES:
                self.series(self.requests, route, method, status)

    def finished(self, response: Response) -> Response:
        """Count the request by route template, method and status class (after_request)."""
        current = request._get_current_object()  # type: ignore[attr-defined]  # looked up once
        rule = current.url_rule
        if rule is not None and rule.endpoint == SCRAPE:
            return response  # a scrape is not a request of the API
        # The template (/sessions/<sid>), never the path; a client's own method is OTHER.
        route = rule.rule if rule is not None else UNMATCHED
        method = current.method
        if method not in METHODS:
            method = OTHER
        count, latency = self.answered(route, method, response.status_code)
        count.inc()
        if (started := current.environ.get(STARTED)) is not None:
            latency.observe(time.perf_counter() - started)
        self.count_answer(rule, response)
        return response

    def answered(self, route: str, method: str, status: int) -> tuple[Any, Any]:
        """Return the series that counts a request to ``route`` with ``method`` answered with
        ``status`` (by its class), and the one that times it; the pair looked up once and
        kept, as series() keeps each one."""
        key = (route, method, status)
        pair = self._answered.get(key)
        if pair is None:
            count = self.series(self.requests, route, method, f"{status // 100}xx")
            pair = self._answered[key] = count, self.series(self.latency, route)
        return pair

    def count_answer(self, rule: Rule | None, response: Response) -> None:
        """Count what only the answer tells: a busy login, a store error, an introspection."""
        status, endpoint = response.status_code, rule.endpoint if rule else None
        if status == 503:  # two causes, told apart by the error code (errors.py, users.py)
            error = (response.get_json(silent=True) or {}).get("error")
            if error == "store_unavailable":
                self.store_errors.inc()
            elif error == "server_busy" and endpoint == "api.login":
                self.series(self.logins, "busy").inc()
        elif status == 200 and endpoint == "other_services.introspect":
            active = (response.get_json(silent=True) or {}).get("active") is True
            self.series(self.introspections, "true" if active else "false").inc()


def known(label: str, labels: tuple[str, ...]) -> str:
    """Return the label if it is one of ``labels``, else OTHER: the series stay fixed."""
    return label if label in labels else OTHER


def init_app(app: Flask) -> None:
    """Count the audit line and every request, and serve /metrics; in production only where
    METRICS_TOKEN is set: with no scraper to read them, counting would only cost time."""
    if app.config["METRICS_TOKEN"] is None and app.config["APP_ENV"] == "production":
        return  # no /metrics route, whatever the method, and nothing counted
    disable_created_metrics()  # a _created series beside each counter only doubles the scrape
    metrics = Metrics(multiprocess_directory(app.config))
    app.extensions["metrics"] = metrics
    on_audit(app, metrics.count_audited)
    app.wsgi_app = metrics.timed(app.wsgi_app, app.url_map)  # type: ignore[method-assign]
    app.after_request(metrics.finished)
    app.register_blueprint(bp)


def get_metrics() -> Metrics:
    """Return the app's metrics."""
    return current_app.extensions["metrics"]


@bp.get("/metrics", provide_automatic_options=False)
def metrics() -> ResponseReturnValue:
    """Answer the counts in Prometheus's text format; in production, to the scraper alone."""
    token = current_app.config["METRICS_TOKEN"]
    # The form Prometheus's scrape_config `authorization` sends (RFC 6750 §2.1), compared in
    # constant time so that the answer's timing tells nothing of the token.
    if token is not None and not same_text(bearer_token() or "", token):
        message = "Send the scraper's token: 'Authorization: Bearer <METRICS_TOKEN>'."
        headers = {"WWW-Authenticate": 'Bearer realm="metrics"'}
        raise APIError(401, "invalid_token", message, headers)
    return Response(get_metrics().exposition(), content_type=CONTENT_TYPE_LATEST)


def multiprocess_directory(config: Mapping[str, Any]) -> str | None:
    """Return the folder where every worker writes its counts, or None with one process.

    PROMETHEUS_MULTIPROC_DIR when set; else, under granian or gunicorn, a folder of this
    run of the server's main process (run_folder).
    """
    directory = config["PROMETHEUS_MULTIPROC_DIR"]
    if directory is None and config["SERVER"] is not None:
        directory = run_folder()
    if directory is None:
        return None
    # prometheus_client reads the folder from the environment, and picks file-backed values
    # when first imported, so both are set before the first metric of this process.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue(process_id)
    # Its docs: mark_process_dead when a worker exits. atexit covers a worker that exits
    # through sys.exit (gunicorn); Finalize one forked by multiprocessing (granian).
    pid = process_id()
    atexit.register(multiprocess.mark_process_dead, pid, directory)
    multiprocessing.util.Finalize(None, multiprocess.mark_process_dead, (pid, directory), {}, 0)
    return directory


def run_folder() -> str:
    """Return the workers' folder of this run of the main process, made on first use.

    Its name holds the main process's id and start time, so it is fresh for every run, as
    prometheus_client's docs ask (a folder wiped between runs); folders of runs that have
    ended are removed. Only this user may write there (CWE-377: shared /tmp).
    """
    main = os.getppid()  # the server's main process, which forked this worker
    parent = Path(tempfile.gettempdir())
    for folder in parent.glob(RUN_FOLDER + "*"):
        pid, _, started = folder.name.removeprefix(RUN_FOLDER).partition("-")
        if not pid.isdigit() or process_start(int(pid)) == started:
            continue  # a run that goes on
        try:
            owner = folder.lstat().st_uid
        except FileNotFoundError:  # another run starting at once removed it meanwhile
            continue
        if owner == os.getuid():  # never another user's
            shutil.rmtree(folder, ignore_errors=True)  # never follows a symlink
    folder = parent / f"{RUN_FOLDER}{main}-{process_start(main)}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError as error:
        message = f"cannot make {folder} ({error.strerror}); set PROMETHEUS_MULTIPROC_DIR."
        raise ConfigError(message) from None
    status = folder.lstat()
    if folder.is_symlink() or status.st_uid != os.getuid() or status.st_mode & 0o077:
        message = f"{folder} is not this user's alone; set PROMETHEUS_MULTIPROC_DIR."
        raise ConfigError(message)
    return str(folder)


def process_start(pid: int) -> str | None:
    """Return when a process started (in clock ticks since boot), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # proc(5): field 22 is starttime; the name in field 2 may hold spaces, so count from ')'.
    return stat.rpartition(")")[2].split()[19]
