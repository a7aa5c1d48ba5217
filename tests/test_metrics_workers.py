"""/metrics across processes: granian's workers add up, and a real Prometheus scrapes them."""

import collections
import contextlib
import json
import os
import re
import shutil
import signal
import time
import urllib.parse
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import (
    DEMO,
    ROOT,
    call,
    eventually,
    free_port,
    not_installed,
    refresh_body,
    released_together,
    run_to_end,
    serve,
)

METRICS_TOKEN = "metrics-token-0123456789abcdef0123456789"


def scrape(base, token=None):
    """Return {(name, labels...): value} of one scrape, on a connection of its own."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(base + "/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, *sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def succeeded(counts):
    return counts[("jwt_refresh_logins_total", ("outcome", "succeeded"))]


def login_pids(log_path):
    """The process ids of the workers that logged a login in, from the audit lines."""
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if '"audit"' in line]
    return {line["pid"] for line in lines if line["audit"] == "login_succeeded"}


def started_workers(log_path):
    """How many times granian has said a worker started: a respawned one says it again."""
    return len(re.findall(r"Started worker-\d+$", log_path.read_text(), re.M))


def spread_logins(base, log_path, at_least=10):
    """Log in until both workers have served some logins; return how many succeeded."""
    count = 0
    while count < at_least or len(login_pids(log_path)) < 2:
        assert count < 400, "one worker served every login"
        status, _, _ = call(base, "POST", "/login", DEMO)  # a connection of its own each
        assert status == 200
        count += 1
    return count


def test_every_worker_counts_on_every_scrape(start_cluster, tmp_path):
    # No PROMETHEUS_MULTIPROC_DIR: the workers share a folder of this run, in TMPDIR.
    stale = tmp_path / "jwt-refresh-metrics-4194304-1"  # a run that has ended (no such pid)
    stale.mkdir()
    base, log_path = start_cluster(TMPDIR=str(tmp_path))
    count = spread_logins(base, log_path)
    for _ in range(20):  # whichever worker answers, the totals are every worker's
        counts = scrape(base)
        assert succeeded(counts) == count
        key = ("jwt_refresh_http_requests_total", ("method", "POST"), ("route", "/login"))
        assert counts[(*key, ("status", "2xx"))] == count
    (folder,) = tmp_path.glob("jwt-refresh-metrics-*")
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    files = {path.name for path in folder.iterdir()}
    assert {f"counter_{pid}.db" for pid in login_pids(log_path)} <= files
    assert not stale.exists()


def test_logins_sent_together_are_each_counted_once(start_cluster):
    base, _ = start_cluster()
    statuses = released_together(24, lambda _: call(base, "POST", "/login", DEMO)[0])
    counts = scrape(base)
    outcomes = {200: "succeeded", 429: "throttled", 503: "busy"}  # the limits count at once
    assert set(statuses) <= set(outcomes) and 200 in statuses
    for status, outcome in outcomes.items():
        assert counts[("jwt_refresh_logins_total", ("outcome", outcome))] == statuses.count(status)


def test_the_counts_of_a_worker_that_died_stay_in_the_totals(start_cluster, tmp_path):
    respawn = {"GRANIAN_RESPAWN_FAILED_WORKERS": "true", "GRANIAN_RESPAWN_INTERVAL": "0.1"}
    base, log_path = start_cluster(TMPDIR=str(tmp_path), **respawn)
    count = spread_logins(base, log_path, at_least=6)
    before, started = login_pids(log_path), started_workers(log_path)
    os.kill(min(before), signal.SIGKILL)
    # Log in once the worker in its place has started: until then every login lands on the
    # other worker, and enough of them reach the login limits (then none succeeds).
    assert eventually(lambda: started_workers(log_path) > started, seconds=30)
    deadline = time.monotonic() + 30
    answers = collections.Counter()
    while not login_pids(log_path) - before:  # until the worker in its place has served
        assert time.monotonic() < deadline, f"no worker took the dead one's place: {answers}"
        try:
            answer = call(base, "POST", "/login", DEMO)[0]
        except OSError as error:  # a connection the dead worker had accepted
            answer = type(error).__name__
        answers[answer] += 1
        count += answer == 200
    for _ in range(10):
        assert succeeded(scrape(base)) == count


def test_the_operator_names_the_folder(start_cluster, tmp_path):
    folder = tmp_path / "metrics"
    folder.mkdir()
    base, log_path = start_cluster(PROMETHEUS_MULTIPROC_DIR=str(folder))
    count = spread_logins(base, log_path, at_least=4)
    assert succeeded(scrape(base)) == count
    assert {f"counter_{pid}.db" for pid in login_pids(log_path)} <= {
        p.name for p in folder.iterdir()
    }


def test_one_process_needs_no_setting(live_server):
    for _ in range(3):
        assert call(live_server, "POST", "/login", DEMO)[0] == 200
    assert succeeded(scrape(live_server)) == 3


def test_production_under_granian_answers_the_scraper_only(start_cluster):
    base, _ = start_cluster(APP_ENV="production", METRICS_TOKEN=METRICS_TOKEN)
    assert call(base, "GET", "/metrics")[0] == 401
    assert succeeded(scrape(base, METRICS_TOKEN)) == 0


# --- a real Prometheus ---------------------------------------------------------------------


def needs(binary):
    """The path of a binary of Debian's prometheus package; skipped where it is missing."""
    path = shutil.which(binary)
    if path is None:
        not_installed(binary, "Debian's prometheus package (apt-get install prometheus)")
    return path


@pytest.fixture
def prometheus(tmp_path):
    """Start Debian's prometheus on loopback, scraping one target every second."""
    binary = needs("prometheus")
    with contextlib.ExitStack() as stack:

        def start(target):
            port = free_port()
            config = {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ROOT / "docs" / "alerts.yml")],
                "scrape_configs": [
                    {
                        "job_name": "jwt-refresh-service",
                        # Sent as `Authorization: Bearer <credentials>`.
                        "authorization": {"credentials": METRICS_TOKEN},
                        "static_configs": [{"targets": [target]}],
                    }
                ],
            }
            path = tmp_path / "prometheus.yml"
            path.write_text(json.dumps(config))  # JSON is YAML
            command = [
                binary, f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ]  # fmt: skip
            url, _ = stack.enter_context(serve(command, None, tmp_path, port))
            return url

        yield start


def api(prometheus_url, path, **query):
    """Return the data of an answer of Prometheus's HTTP API."""
    url = f"{prometheus_url}/api/v1/{path}?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return answer["data"]


def total(prometheus_url, expression):
    """The sum of an instant query's values, or None while it has none."""
    results = api(prometheus_url, "query", query=expression)["result"]
    return sum(float(result["value"][1]) for result in results) if results else None


def test_a_real_prometheus_reads_the_counts_of_both_workers(start_cluster, prometheus):
    base, log_path = start_cluster(
        APP_ENV="production", METRICS_TOKEN=METRICS_TOKEN, REFRESH_REUSE_GRACE="0"
    )
    prometheus_url = prometheus(urllib.parse.urlsplit(base).netloc)
    count = spread_logins(base, log_path, at_least=6)  # over both workers
    _, _, tokens = call(base, "POST", "/login", DEMO)
    assert call(base, "POST", "/token", refresh_body(tokens))[0] == 200
    assert call(base, "POST", "/token", refresh_body(tokens))[0] == 403  # reuse: it ends
    _, _, other = call(base, "POST", "/login", DEMO)
    assert call(base, "POST", "/logout", refresh_body(other))[0] == 204
    expected = {
        'jwt_refresh_logins_total{outcome="succeeded"}': count + 2,
        'jwt_refresh_refreshes_total{outcome="rotated"}': 1,
        'jwt_refresh_refreshes_total{outcome="reuse"}': 1,
        'jwt_refresh_sessions_ended_total{reason="reuse"}': 1,
        'jwt_refresh_sessions_ended_total{reason="logout_local"}': 1,
        'sum(jwt_refresh_http_requests_total{route="/token", status=~"2xx|4xx"})': 2,
        'up{job="jwt-refresh-service"}': 1,  # scraped with the token: 0 if it were refused
    }

    def read():
        return {expression: total(prometheus_url, expression) for expression in expected}

    assert eventually(lambda: read() == expected, seconds=30, every=0.25), read()
    # The alert rules loaded, and Prometheus evaluates every one of them without an error.
    rules = alerts_yml_rules()

    def health():
        groups = api(prometheus_url, "rules")["groups"]
        return {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}

    assert eventually(lambda: health() == dict.fromkeys(rules, "ok"), seconds=30, every=0.25), (
        health()
    )


def alerts_yml_rules():
    """The names of the alerts of docs/alerts.yml."""
    return re.findall(r"^\s+- alert: (\w+)$", (ROOT / "docs" / "alerts.yml").read_text(), re.M)


def test_the_alert_rules_pass_their_unit_tests():
    command = [needs("promtool"), "test", "rules", str(ROOT / "tests" / "alerts_test.yml")]
    status, output = run_to_end(command, None, ROOT)
    assert status == 0, output
    status, output = run_to_end(
        [needs("promtool"), "check", "rules", "docs/alerts.yml"], None, ROOT
    )
    assert status == 0, output


def test_the_alert_rules_watch_only_documented_metrics():
    used = re.findall(r"\bjwt_refresh_\w+", (ROOT / "docs" / "alerts.yml").read_text())
    documented = re.findall(r"`(jwt_refresh_\w+)", (ROOT / "docs" / "metrics.md").read_text())
    assert used and {re.sub(r"_(bucket|count|sum)$", "", name) for name in used} <= set(documented)
