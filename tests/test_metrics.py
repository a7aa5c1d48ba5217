"""GET /metrics: what it counts, who may read it, and that its series stay fixed."""

import base64
import os
import re
import tempfile
import time
from pathlib import Path

import pytest
import time_machine
from argon2 import PasswordHasher
from prometheus_client.parser import text_string_to_metric_families

import metrics
import users
from server import create_app
from settings import ConfigError
from web import audit

from .conftest import DEMO, DEMO_ID, PRODUCTION, TEST_CONFIG, WITH_DEMO, released_together

METRICS_TOKEN = "metrics-token-0123456789abcdef0123456789"
CLIENT = "posts:posts-secret-0123456789"


def samples(client, headers=None):
    """Scrape /metrics; return {(name, ((label, value), ...)): value} of every sample."""
    response = client.get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.data
    assert response.mimetype == "text/plain"
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.get_data(as_text=True))
        for sample in family.samples
    }


def value(client, name, **labels):
    return samples(client).get((f"jwt_refresh_{name}", tuple(sorted(labels.items()))))


def logins(client, outcome):
    return value(client, "logins_total", outcome=outcome)


def refreshes(client, outcome):
    return value(client, "refreshes_total", outcome=outcome)


def ended(client, reason):
    return value(client, "sessions_ended_total", reason=reason)


def requests_of(client, route, method, status):
    return value(client, "http_requests_total", route=route, method=method, status=status)


def test_it_answers_the_text_format_with_every_outcome_at_zero(client):
    assert logins(client, "succeeded") == 0
    assert refreshes(client, "reuse") == 0
    assert ended(client, "password_changed") == 0
    assert value(client, "store_errors_total") == 0
    # No _created series: they would double the scrape and are absent across workers.
    assert not [key for key in samples(client) if key[0].endswith("_created")]


def test_logins_by_outcome(client, auth_actions):
    auth_actions.login()
    auth_actions.login(password="wrong")
    auth_actions.login(password="wrong")
    assert (logins(client, "succeeded"), logins(client, "failed")) == (1, 2)


def test_a_throttled_login_is_counted():
    client = create_app(TEST_CONFIG | {"LOGIN_RATE_LIMIT": "2 per minute"}).test_client()
    statuses = [client.post("/login", json=DEMO | {"password": "x"}).status_code for _ in "abc"]
    assert statuses == [401, 401, 429]
    assert (logins(client, "failed"), logins(client, "throttled")) == (2, 1)


def test_a_busy_login_is_counted(monkeypatch):
    # One hashing slot, no wait for it, and a check that holds it for tens of milliseconds
    # (64 MiB Argon2id): the logins sent with the first find it taken.
    monkeypatch.setattr(users, "SLOT_WAIT", 0)
    monkeypatch.setattr(users, "PASSWORD_HASHER", PasswordHasher(memory_cost=65536))
    client = create_app(TEST_CONFIG | {"MAX_CONCURRENT_LOGINS": "1"}).test_client()
    statuses = released_together(8, lambda _: client.post("/login", json=DEMO).status_code)
    assert set(statuses) <= {200, 503} and 503 in statuses
    assert logins(client, "busy") == statuses.count(503)
    assert logins(client, "succeeded") == statuses.count(200)


def test_refreshes_by_outcome_and_the_sessions_reuse_ends(client, auth_actions):
    tokens = auth_actions.tokens()
    assert auth_actions.refresh(tokens["refreshToken"]).status_code == 200
    assert auth_actions.refresh(tokens["refreshToken"]).status_code == 200  # within the grace
    with time_machine.travel(time.time() + 11):  # past the reuse grace window
        assert auth_actions.refresh(tokens["refreshToken"]).status_code == 403
    assert auth_actions.refresh(tokens["refreshToken"]).status_code == 403  # session ended
    assert auth_actions.refresh("not-a-token").status_code == 403
    counts = {o: refreshes(client, o) for o in ("rotated", "retried", "reuse")}
    assert counts == {"rotated": 1, "retried": 1, "reuse": 1}
    assert (refreshes(client, "session_ended"), refreshes(client, "invalid_token")) == (1, 1)
    assert ended(client, "reuse") == 1


@pytest.mark.parametrize("scope", ["local", "others", "global"])
def test_sessions_ended_by_logout_scope(client, auth_actions, scope):
    first, second = auth_actions.tokens(), auth_actions.tokens()
    body = {"refreshToken": second["refreshToken"], "scope": scope}
    assert client.post("/logout", json=body).status_code == 204
    assert ended(client, f"logout_{scope}") == {"local": 1, "others": 1, "global": 2}[scope]
    still_live = auth_actions.me(first["accessToken"]).status_code == 200
    assert still_live == (scope == "local")  # the other session: what "others" ends too


def test_sessions_ended_by_the_user_and_by_the_cap(auth_actions):
    client = create_app(TEST_CONFIG | {"MAX_SESSIONS_PER_USER": "2"}).test_client()
    actions = type(auth_actions)(client)
    tokens = [actions.tokens() for _ in range(3)]  # the third login ends the first session
    sessions = client.get("/sessions", headers=bearer(tokens[2]["accessToken"])).json
    other = next(s["id"] for s in sessions["sessions"] if not s["current"])
    response = client.delete(f"/sessions/{other}", headers=bearer(tokens[2]["accessToken"]))
    assert response.status_code == 204
    assert (ended(client, "cap"), ended(client, "ended_by_user")) == (1, 1)


def test_a_session_whose_account_was_removed(redis_url, redis_client):
    # Two servers share a store; the second has no such account: it was removed there.
    with_demo = create_app(TEST_CONFIG | {"REDIS_URL": redis_url}).test_client()
    without = create_app(
        TEST_CONFIG | {"REDIS_URL": redis_url, "DEMO_USER_EMAIL": "other@example.com"}
    ).test_client()
    tokens = with_demo.post("/login", json=DEMO).json
    assert without.post("/token", json={"refreshToken": tokens["refreshToken"]}).status_code == 403
    assert (refreshes(without, "account_removed"), ended(without, "account_removed")) == (1, 1)


def test_a_password_change_counts_the_sessions_it_ended(app, client):
    # The contract for the password-change route: one audit line with the count it ended.
    with app.test_request_context("/password", method="POST"):
        audit("password_changed", user=DEMO_ID, ended="3")
        audit("password_changed", user=DEMO_ID, ended=2)  # a count as an int: the same
        audit("password_changed", user=DEMO_ID)  # none ended, or not said: nothing to add
        audit("password_changed", user=DEMO_ID, ended="-1")
    assert ended(client, "password_changed") == 5


def test_a_reason_the_metrics_do_not_know_is_other(app, client):
    with app.test_request_context("/"):
        audit("session_ended", user=DEMO_ID, reason="a_new_reason")
    assert ended(client, "other") == 1
    assert not [key for key in samples(client) if ("reason", "a_new_reason") in key[1]]


def test_introspection_answers_and_refused_clients():
    client = create_app(TEST_CONFIG | {"INTROSPECTION_CLIENTS": CLIENT}).test_client()
    access = client.post("/login", json=DEMO).json["accessToken"]
    auth = {"Authorization": "Basic " + base64.b64encode(CLIENT.encode()).decode()}
    for token, headers in [(access, auth), ("junk", auth), (access, {}), (access, bearer("x"))]:
        client.post("/introspect", data={"token": token}, headers=headers)
    assert value(client, "introspections_total", active="true") == 1
    assert value(client, "introspections_total", active="false") == 1
    assert value(client, "introspection_clients_refused_total") == 2


def test_a_store_that_fails_is_counted(own_redis):
    client = create_app(TEST_CONFIG | {"REDIS_URL": own_redis.url}).test_client()
    assert client.get("/healthz").status_code == 200
    own_redis.stop()
    assert client.post("/login", json=DEMO).status_code == 503
    assert client.get("/healthz").status_code == 503
    assert value(client, "store_errors_total") == 2
    assert requests_of(client, "/healthz", "GET", "5xx") == 1


def test_requests_by_route_template_method_and_status_class(client, auth_actions):
    tokens = auth_actions.tokens()
    client.delete("/sessions/no-such-session-id", headers=bearer(tokens["accessToken"]))
    client.get("/no/such/path")
    client.open("/me", method="BREW")
    auth_actions.me(tokens["accessToken"])
    assert requests_of(client, "/login", "POST", "2xx") == 1
    assert requests_of(client, "/sessions/<sid>", "DELETE", "4xx") == 1
    assert requests_of(client, "/me", "GET", "2xx") == 1
    assert requests_of(client, "unmatched", "GET", "4xx") == 1
    assert requests_of(client, "unmatched", "other", "4xx") == 1  # 405: no rule matched
    assert value(client, "http_request_duration_seconds_count", route="/login") == 1
    # A scrape is not a request of the API, however many there are.
    assert not [key for key in samples(client) if ("route", "/metrics") in key[1]]


def test_junk_paths_methods_and_headers_add_no_series(client, auth_actions):
    tokens = auth_actions.tokens()

    def junk(n):
        headers = {"X-Junk": f"j{n}", "User-Agent": f"agent-{n}", "X-Forwarded-For": f"10.0.0.{n}"}
        client.get(f"/junk-{n}/{'a' * n}", headers=headers)
        client.open(f"/me?x={n}", method=f"M{n}", headers=headers)
        client.delete(f"/sessions/sid-{n}", headers=bearer(tokens["accessToken"]) | headers)
        client.post("/token", json={"refreshToken": f"junk-{n}"}, headers=headers)
        client.post("/login", json={"email": f"u{n}@example.com", "password": "x"})

    before = samples(client)  # a fresh app's first scrape
    for n in range(1, 30):
        junk(n)
    # Nor does the app's own note of the series each kind of request counts in grow.
    answered = client.application.extensions["metrics"]._answered
    kinds = len(answered)
    for n in range(30, 60):
        junk(n)
    assert len(answered) == kinds
    # Every route with every method, junk ones too: an answer of every class.
    for rule in client.application.url_map.iter_rules():
        path = re.sub(r"<[^>]*>", "x", rule.rule)
        for method in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "BREW", "G3T"]:
            client.open(path, method=method, headers={"X-Junk": "j" * 60_000}).close()
    after = samples(client)
    assert after.keys() == before.keys()
    labels = {value for key in after for _, value in key[1]}
    assert not [label for label in labels if "junk" in label or "sid-" in label or "M5" in label]
    assert not [label for label in labels if DEMO_ID in label or "example.com" in label]


def test_development_answers_without_a_token(client):
    assert client.get("/metrics").status_code == 200


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE", "BREW"])
def test_production_without_metrics_token_has_no_such_route(method):
    client = create_app(WITH_DEMO | PRODUCTION).test_client()
    response = client.open("/metrics", method=method)
    nothing = client.open("/no-such-route", method=method)
    assert response.status_code == nothing.status_code == 404
    assert response.get_data() == nothing.get_data() and "Allow" not in response.headers


def test_production_without_metrics_token_counts_nothing():
    app = create_app(WITH_DEMO | PRODUCTION)
    assert "metrics" not in app.extensions
    assert getattr(app.wsgi_app, "__name__", None) != "timed_app"
    assert not [hook for hook in app.after_request_funcs[None] if "metrics" in repr(hook)]


def test_options_on_metrics_shows_nothing_and_no_allow_list():
    client = create_app(WITH_DEMO | PRODUCTION | {"METRICS_TOKEN": METRICS_TOKEN}).test_client()
    response = client.options("/metrics")
    assert response.status_code == 405
    assert b"jwt_refresh" not in response.data


@pytest.mark.parametrize(
    "token",
    [f" {METRICS_TOKEN}", f"{METRICS_TOKEN} ", f"tökén-{METRICS_TOKEN}", f"a b{METRICS_TOKEN}"],
)
def test_a_metrics_token_no_bearer_header_can_carry_stops_the_start(token):
    with pytest.raises(ConfigError, match="METRICS_TOKEN must be a bearer token"):
        create_app(TEST_CONFIG | {"METRICS_TOKEN": token})


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer wrong", f"Basic {METRICS_TOKEN}", f"Bearer {METRICS_TOKEN}x",
     f"Bearer {METRICS_TOKEN[:-1]}", "Bearer é\u00ff", f"Bearer  {METRICS_TOKEN[1:]}"],
)  # fmt: skip
def test_production_answers_only_to_the_metrics_token(authorization):
    client = create_app(WITH_DEMO | PRODUCTION | {"METRICS_TOKEN": METRICS_TOKEN}).test_client()
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 401
    assert response.json["error"] == "invalid_token"
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="metrics"'
    assert samples(client, bearer(METRICS_TOKEN))  # and the scraper's token opens it


def test_a_short_metrics_token_stops_the_start():
    with pytest.raises(Exception, match="METRICS_TOKEN is shorter than 32"):
        create_app(TEST_CONFIG | {"METRICS_TOKEN": "short"})


def test_a_multiproc_dir_that_does_not_exist_stops_the_start(tmp_path):
    with pytest.raises(Exception, match="PROMETHEUS_MULTIPROC_DIR must name a directory"):
        create_app(TEST_CONFIG | {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "none")})


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_the_process_id_the_counts_are_filed_under_is_a_forked_childs_own():
    # prometheus_client files each process's counts under process_id() (multiprocess mode).
    assert metrics.process_id() == os.getpid()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: report what it is filed under, and leave at once
        os.write(write, str(metrics.process_id()).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    assert int(os.read(read, 64)) == child
    os.close(read)
    assert metrics.process_id() == os.getpid()


def test_a_folder_another_run_removes_meanwhile_does_not_stop_the_start(tmp_path, monkeypatch):
    # Two servers starting at once each clear the folders of ended runs: the other may remove
    # one between this run's listing of the folders and its look at that one.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / "jwt-refresh-metrics-4194304-1"  # a run that has ended (no such pid)
    stale.mkdir()
    started = metrics.process_start

    def another_run_removes_it(pid):
        if pid == 4194304:
            stale.rmdir()
        return started(pid)

    monkeypatch.setattr(metrics, "process_start", another_run_removes_it)
    folder = Path(metrics.run_folder())
    assert folder.is_dir() and not stale.exists()
