"""Past one Redis: REDIS_URL of every kind, a user's keys in one slot, and the service on a real
Redis Cluster and a real Sentinel group (tests/topology.py), under granian with two workers,
through a master dying mid-traffic. No mocks: every server is a real process on loopback."""

import contextlib
import logging
import threading

import pytest
from redis.cluster import RedisCluster

from redis_store import RedisStore, Target, connect, parse_url
from server import create_app
from settings import ConfigError
from store import Policy
from users import hash_password

from .conftest import (
    DEMO,
    DEMO_ID,
    TEST_CONFIG,
    WITH_DEMO,
    call,
    eventually,
    free_port,
    granian,
    refresh_body,
    released_together,
    run_server,
    serve,
    start,
    stop_group,
    topology_binaries,
    user_env,
    wait_for_port,
)
from .topology import RedisClusterNodes, wait_until

PASSWORD = "s3cret-in-the-url"
WRONG = DEMO | {"password": "wrong-password"}
RECOVERY = 30  # seconds: a failover here takes three to five
STORE_UNAVAILABLE = {
    "error": "store_unavailable",
    "message": "The session store is not answering. Try again in a few seconds.",
}


# --- REDIS_URL, spelt as limits spells it ---------------------------------------------------


@pytest.mark.parametrize(
    "url, target",
    [
        (f"redis://:{PASSWORD}@10.0.0.5:6380/2", Target("redis", ("10.0.0.5:6380",))),
        ("rediss://cache.example", Target("redis", ("cache.example:6379",))),
        ("unix:///run/redis.sock", Target("redis", ("/run/redis.sock",))),
        ("redis+unix:///run/redis.sock", Target("redis", ("/run/redis.sock",))),
        (
            f"redis+cluster://:{PASSWORD}@10.0.0.1:7000, 10.0.0.2:7001",
            Target("cluster", ("10.0.0.1:7000", "10.0.0.2:7001")),
        ),
        (
            f"redis+sentinel://user:{PASSWORD}@10.0.0.1:26379,10.0.0.2:26379/mymaster",
            Target("sentinel", ("10.0.0.1:26379", "10.0.0.2:26379"), "mymaster"),
        ),
    ],
)
def test_redis_url_of_every_kind(url, target):
    assert parse_url(url) == target
    assert PASSWORD not in str(parse_url(url))


@pytest.mark.parametrize(
    "url, reason",
    [
        (f"http://:{PASSWORD}@127.0.0.1:6379", "it must start with one of redis://"),
        ("not a url", "it must start with one of redis://"),
        (f"valkey+cluster://:{PASSWORD}@127.0.0.1:7000", "it must start with one of"),
        (f"redis+cluster://:{PASSWORD}@", "'' is not a host:port"),
        (f"redis+cluster://:{PASSWORD}@127.0.0.1", "'127.0.0.1' is not a host:port"),
        (f"redis+cluster://:{PASSWORD}@127.0.0.1:7000,:7001", "':7001' is not a host:port"),
        (f"redis+cluster://:{PASSWORD}@127.0.0.1:99999", "'127.0.0.1:99999' is not a host:port"),
        (f"redis+sentinel://:{PASSWORD}@127.0.0.1:26379", "needs the service's name"),
        (f"redis+sentinel://:{PASSWORD}@127.0.0.1:26379/", "needs the service's name"),
        (f"redis://:{PASSWORD}@127.0.0.1:port/0", "Port could not be cast"),
        (f"redis://:{PASSWORD}@127.0.0.1:6379/nodb", "the path must be a database number"),
    ],
)
def test_a_malformed_redis_url_stops_the_start_naming_it_and_not_its_password(url, reason):
    with pytest.raises(ConfigError) as raised:
        create_app(TEST_CONFIG | {"REDIS_URL": url})
    message = raised.value.message
    assert message.startswith("REDIS_URL is not a Redis URL: ")
    assert reason in message
    assert PASSWORD not in message


# A password with characters a URL gives a meaning to, as users write it: unencoded.
RAW = "SEK/RIT#PASS?WORD:x"


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{RAW}@127.0.0.1:6379/0",
        f"rediss://user:{RAW}@cache.example:6380",
        f"redis+cluster://:{RAW}@127.0.0.1:7000,127.0.0.1:7001",
        f"redis+sentinel://:{RAW}@127.0.0.1:26379/mymaster",
        f"redis+cluster://:{RAW.replace('/', '#')}@127.0.0.1:1",
        f"redis://:{RAW.replace('/', '?')}@127.0.0.1:1/0",
    ],
)
def test_a_password_not_percent_encoded_is_refused_and_no_piece_of_it_shown(url):
    with pytest.raises(ConfigError) as raised:
        create_app(TEST_CONFIG | {"REDIS_URL": url})
    message = raised.value.message
    assert message.startswith("REDIS_URL is not a Redis URL: ")
    assert "percent-encoded" in message
    for piece in ("SEK", "RIT", "PASS", "WORD"):
        assert piece not in message


@pytest.mark.parametrize(
    "query", ["?foo=bar", "?ssl=yes", "?socket_timeout=soon", "?ssl_cert_reqs=bogus"]
)
def test_an_option_redis_py_does_not_take_stops_the_start_naming_redis_url(query):
    scheme = "rediss" if "ssl" in query else "redis"
    with pytest.raises(ConfigError) as raised:
        create_app(TEST_CONFIG | {"REDIS_URL": f"{scheme}://:{PASSWORD}@127.0.0.1:1/0{query}"})
    message = raised.value.message
    assert message.startswith("REDIS_URL")
    assert PASSWORD not in message


def test_the_user_and_password_of_the_url_are_percent_decoded():
    target = parse_url("redis+cluster://al%40ce:p%40ss%3Aw%2Frd%23%3F%25x%2Cy@127.0.0.1:7000")
    assert target.login() == {"username": "al@ce", "password": "p@ss:w/rd#?%x,y"}
    assert "p@ss" not in str(target) and "p@ss" not in repr(target)
    assert parse_url("redis+cluster://127.0.0.1:7000").login() == {}


ACL_USER, ACL_PASSWORD = "alice", "p@ss:w/rd#?%x,y"
ENCODED = "alice:p%40ss%3Aw%2Frd%23%3F%25x%2Cy"


def test_a_cluster_url_with_a_percent_encoded_password_logs_in(redis_cluster):
    admins = [redis_cluster.nodes[port].admin for port in redis_cluster.ports]
    for admin in admins:
        admin.execute_command(
            "ACL", "SETUSER", ACL_USER, "on", f">{ACL_PASSWORD}", "~*", "&*", "+@all"
        )
    try:
        nodes = ",".join(f"{host}:{port}" for host, port in redis_cluster.startup_nodes)
        client = create_app(
            WITH_DEMO | {"REDIS_URL": f"redis+cluster://{ENCODED}@{nodes}"}
        ).test_client()
        assert client.post("/login", json=DEMO).status_code == 200
        wrong = f"redis+cluster://{ACL_USER}:not-the-password@{nodes}"
        with pytest.raises(ConfigError, match="refuses its password"):
            create_app(WITH_DEMO | {"REDIS_URL": wrong})
    finally:
        for admin in admins:
            admin.execute_command("ACL", "DELUSER", ACL_USER)


def test_python_server_py_refuses_an_unknown_scheme_without_showing_the_password(tmp_path):
    result = run_server(TEST_CONFIG | {"REDIS_URL": f"memcached://:{PASSWORD}@h:1"}, tmp_path)
    assert result.returncode != 0
    assert "error: REDIS_URL is not a Redis URL" in result.stderr
    assert PASSWORD not in result.stdout + result.stderr


def test_a_cluster_that_does_not_answer_at_start_stops_it_naming_its_nodes(tmp_path):
    # A cluster client cannot be built without one node's map of the slots.
    port = free_port()
    url = f"redis+cluster://:{PASSWORD}@127.0.0.1:{port}"
    with pytest.raises(ConfigError) as raised:
        create_app(TEST_CONFIG | {"REDIS_URL": url})
    message = raised.value.message
    assert message.startswith(
        f"REDIS_URL: no start-up node of the Redis Cluster at 127.0.0.1:{port}"
    )
    assert PASSWORD not in message


def started(url, caplog):
    """Build the app on REDIS_URL=url; return its test client and the errors it logged."""
    with caplog.at_level(logging.ERROR):
        client = create_app(TEST_CONFIG | {"REDIS_URL": url}).test_client()
    return client, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_redis_that_does_not_answer_at_start_is_said_once_and_tried_again(tmp_path, caplog):
    port = free_port()
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    client, errors = started(url, caplog)
    assert errors == [
        f"REDIS_URL: the Redis at 127.0.0.1:{port} does not answer (ConnectionError); "
        "requests that need the store answer 503 until it does."
    ]
    response = client.get("/healthz")
    assert (response.status_code, response.json) == (503, STORE_UNAVAILABLE)
    # Redis comes up, with the URL's password: the same app serves, without a restart.
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    process = start([*command, "--requirepass", PASSWORD], None, tmp_path)
    try:
        wait_for_port(port, process)
        assert client.get("/healthz").json == {"status": "ok", "store": "redis"}
        assert client.post("/login", json=DEMO).status_code == 200
    finally:
        stop_group(process)
    assert PASSWORD not in caplog.text


def test_sentinels_that_do_not_answer_at_start_are_said_once(caplog):
    ports = [free_port(), free_port()]
    where = ", ".join(f"127.0.0.1:{port}" for port in ports)
    url = f"redis+sentinel://:{PASSWORD}@{where.replace(' ', '')}/mymaster"
    client, errors = started(url, caplog)
    assert errors == [
        f"REDIS_URL: the master the Sentinels at {where} name 'mymaster' does not answer "
        "(MasterNotFoundError); requests that need the store answer 503 until it does."
    ]
    assert client.post("/login", json=DEMO).status_code == 503
    assert PASSWORD not in caplog.text


# --- one slot per user, users over every master --------------------------------------------


@pytest.fixture
def cluster(redis_cluster):
    """The session's cluster, emptied before and after the test."""
    redis_cluster.flushall()
    yield redis_cluster
    redis_cluster.flushall()


def test_a_users_keys_share_one_slot_and_users_spread_over_every_master(cluster):
    app = create_app(TEST_CONFIG | {"REDIS_URL": cluster.url})
    store, policy, now = app.extensions["store"], app.extensions["policy"], 1_900_000_000
    users = [f"user-{n}" for n in range(48)]
    for user in users:
        for _ in range(2):
            store.start(policy.new_session(user, now, "curl", "127.0.0.1"), now - 3600)
    masters = cluster.master_ports()
    keys_of = {port: cluster.nodes[port].admin.keys("jwt:*") for port in masters}
    assert all(keys_of[port] for port in masters), keys_of  # every master holds sessions
    for user in users:
        keys = [key for found in keys_of.values() for key in found if f"{{{user}}}" in key]
        assert len(keys) == 3  # two sessions and the index
        admin = cluster.nodes[masters[0]].admin
        assert len({admin.execute_command("CLUSTER", "KEYSLOT", key) for key in keys}) == 1
        assert sum(any(key in keys_of[port] for key in keys) for port in masters) == 1


def test_a_script_given_too_few_keys_writes_nothing_and_names_the_sessions(cluster):
    # The login's script goes through the user's index: finding a session it was not given
    # (a login of the same user landed in between), it writes nothing and names them all.
    client, _ = connect(cluster.url, parse_url(cluster.url))
    try:
        store, policy, now = RedisStore(client, Policy()), Policy(), 1_900_000_000
        first = policy.new_session("alice", now, "", "")
        store.start(first, now - 10)
        second = policy.new_session("alice", now, "", "")
        index, key = "jwt:{alice}:sessions", f"jwt:{{alice}}:session:{second.id}"
        args = ["jwt:{alice}:session:", now - 10, 20, second.id, second.deadline, "user", "alice"]
        assert store._start(keys=[index, key], args=args) == [1, first.id.encode()]
        assert client.exists(key) == 0
        assert store.start(second, now - 10) == []  # the store itself declares both
        assert [s.id for s in store.sessions("alice", now - 10)] == [second.id, first.id]
    finally:
        client.close()


# --- the service, under granian with two workers -------------------------------------------


@contextlib.contextmanager
def service(url, folder, **settings):
    """The README's production command, two workers, on the topology `url` names."""
    port = free_port()
    env = user_env(**(WITH_DEMO | {"REDIS_URL": url} | settings))
    with serve(granian(port), env, folder, port) as (base, log_path):
        yield base, log_path


def login(base):
    status, _, tokens = call(base, "POST", "/login", DEMO)
    assert status == 200, tokens
    return tokens


def the_whole_story(base):
    """What a single Redis does, on this topology: rotation, races, reuse, logout scopes."""
    first = login(base)
    assert call(base, "GET", "/me", token=first["accessToken"])[:3:2] == (
        200,
        {"id": DEMO_ID, "email": DEMO["email"]},
    )
    # 16 refreshes of one token released together: one successor, which all of them get.
    answers = released_together(16, lambda n: call(base, "POST", "/token", refresh_body(first)))
    assert [status for status, _, _ in answers] == [200] * 16
    successors = {body["refreshToken"] for _, _, body in answers}
    assert len(successors) == 1
    successor = answers[0][2]
    # The successor rotates; the first token, no longer the one just spent, is reuse.
    newest = call(base, "POST", "/token", refresh_body(successor))[2]
    status, _, body = call(base, "POST", "/token", refresh_body(first))
    assert (status, body["error"]) == (403, "invalid_refresh_token")
    assert "already used" in body["message"]
    assert call(base, "GET", "/me", token=newest["accessToken"])[0] == 401  # session ended
    # Three sessions; the list; one ended by id; "others" then "global".
    sessions = [login(base) for _ in range(3)]
    listed = call(base, "GET", "/sessions", token=sessions[0]["accessToken"])[2]["sessions"]
    assert len(listed) == 3 and sum(entry["current"] for entry in listed) == 1
    ended = next(entry["id"] for entry in listed if not entry["current"])
    assert call(base, "DELETE", f"/sessions/{ended}", token=sessions[0]["accessToken"])[0] == 204
    logout = refresh_body(sessions[0]) | {"scope": "others"}
    assert call(base, "POST", "/logout", logout)[0] == 204
    alive = [call(base, "GET", "/me", token=s["accessToken"])[0] for s in sessions]
    assert alive == [200, 401, 401]
    assert call(base, "POST", "/logout", refresh_body(sessions[0]) | {"scope": "global"})[0] == 204
    assert call(base, "GET", "/me", token=sessions[0]["accessToken"])[0] == 401
    # The login counters share the URL: wrong passwords count across both workers.
    assert [call(base, "POST", "/login", WRONG)[0] for _ in range(3)] == [401, 401, 429]


def test_the_service_on_a_cluster_behaves_as_on_one_redis(cluster, tmp_path):
    with service(cluster.url, tmp_path, LOGIN_RATE_LIMIT="2 per 15 minutes") as (base, _):
        the_whole_story(base)


def test_the_service_under_sentinel_behaves_as_on_one_redis(redis_sentinel, tmp_path):
    redis_sentinel.flushall()
    with service(redis_sentinel.url, tmp_path, LOGIN_RATE_LIMIT="2 per 15 minutes") as (base, _):
        the_whole_story(base)


class Traffic:
    """GET /me with one token, over and over on a thread, keeping every answer."""

    def __init__(self, base, token):
        self.base, self.token, self.answers = base, token, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self):
        while not self._stop.is_set():
            status, headers, body = call(self.base, "GET", "/me", token=self.token)
            self.answers.append((status, headers.get("Retry-After"), body))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()


def survives_a_failover(base, kill_master, sync_replicas):
    """Sessions made, replicated, the master killed mid-traffic: 503 with Retry-After, never
    another error, then answers again without a restart, every replicated session live."""
    sessions = [login(base) for _ in range(6)]
    sync_replicas()  # what the replica has is what survives (replication is asynchronous)
    with Traffic(base, sessions[0]["accessToken"]) as traffic:
        wait_until(lambda: traffic.answers, 10, "the first answer")
        kill_master()
        wait_until(
            lambda: any(a[0] == 503 for a in traffic.answers)
            and traffic.answers[-1][0] == 200,
            RECOVERY, "503s, then answers again",
        )  # fmt: skip
    statuses = {status for status, _, _ in traffic.answers}
    assert statuses == {200, 503}, statuses
    for status, retry_after, body in traffic.answers:
        if status == 503:
            assert (retry_after, body) == ("5", STORE_UNAVAILABLE)
    # Every session was replicated: each lives on, and a new one is made. The traffic's
    # connection was one worker's; the other may meet the dead master at its own first request
    # after, a 503 as well, and again until its client's next refresh of the map is due
    # (redis-py refreshes it at most once a second).
    for tokens in sessions:
        for statuses in (
            past_503s(base, "GET", "/me", token=tokens["accessToken"]),
            past_503s(base, "POST", "/token", refresh_body(tokens)),
        ):
            assert statuses[-1] == 200 and set(statuses) <= {200, 503}, statuses
    statuses = past_503s(base, "POST", "/login", DEMO)
    assert statuses[-1] == 200 and set(statuses) <= {200, 503}, statuses


def past_503s(base, method, path, body=None, token=None):
    """Call until the answer is not a 503, within RECOVERY; return every status answered."""
    statuses = []

    def answered():
        statuses.append(call(base, method, path, body, token=token)[0])
        return statuses[-1] != 503

    eventually(answered, RECOVERY)
    return statuses


def test_a_sentinel_failover_mid_traffic_is_503_then_service_with_every_session(
    redis_sentinel, tmp_path
):
    redis_sentinel.flushall()
    with service(redis_sentinel.url, tmp_path) as (base, _):
        try:
            survives_a_failover(
                base,
                kill_master=redis_sentinel.kill_master,
                sync_replicas=lambda: redis_sentinel.sync_replicas(redis_sentinel.master_port()),
            )
        finally:
            redis_sentinel.heal()


def test_a_cluster_failover_mid_traffic_is_503_then_service_with_every_session(cluster, tmp_path):
    nodes = [(host, port) for host, port in cluster.startup_nodes]
    with RedisCluster(host=nodes[0][0], port=nodes[0][1]) as client:
        owner = client.get_node_from_key(f"jwt:{{{DEMO_ID}}}:sessions").port  # the demo's master
    with service(cluster.url, tmp_path) as (base, _):
        try:
            survives_a_failover(
                base,
                kill_master=lambda: cluster.kill_master(owner),
                sync_replicas=lambda: cluster.sync_replicas(owner),
            )
        finally:
            cluster.heal()


def test_every_cluster_node_gone_is_a_503_never_a_500(tmp_path):
    # redis-py raises RedisClusterException, no RedisError, when no node answers at all.
    binaries = topology_binaries("redis")
    users_file = tmp_path / "users.txt"
    users_file.write_text(f"alice@example.com:{hash_password('correct horse battery')}\n")
    with RedisClusterNodes(tmp_path / "cluster", binaries, replicas=0) as nodes:
        app = create_app(WITH_DEMO | {"REDIS_URL": nodes.url, "USERS_FILE": str(users_file)})
        client = app.test_client()
        tokens = client.post("/login", json=DEMO).json
        for node in nodes.nodes.values():
            node.kill()
        # `flask users remove` cannot end the account's sessions: it says so, and keeps it.
        removed = app.test_cli_runner().invoke(args=["users", "remove", "alice@example.com"])
        assert removed.exit_code == 1
        # RedisClusterException, or ConnectionError for a node whose socket was still known.
        assert "The session store does not answer (" in removed.output
        assert "nothing changed." in removed.output and "Traceback" not in removed.output
        assert "alice@example.com:" in users_file.read_text()
        answers = [
            client.post("/login", json=DEMO),
            client.post("/token", json=refresh_body(tokens)),
            client.get("/me", headers={"Authorization": f"Bearer {tokens['accessToken']}"}),
            client.get("/healthz"),
        ]
        for response in answers:
            assert (response.status_code, response.json) == (503, STORE_UNAVAILABLE)
            assert response.headers["Retry-After"] == "5"


# --- what each route costs in Redis commands (docs/scaling.md quotes these) ----------------

ROUTE_COMMANDS = {  # route: (sent by the service, run inside its scripts in all)
    "POST /token": ({"EVALSHA": 1}, 9),
    "GET /me": ({"HMGET": 1}, 0),
    "GET /sessions (2 sessions)": ({"HMGET": 3, "ZREVRANGE": 1}, 0),
    "POST /logout": ({"HMGET": 1, "EVALSHA": 1}, 4),
    "POST /logout, scope global": ({"HMGET": 1, "EVALSHA": 2}, 4),
    "GET /healthz": ({"PING": 1}, 0),
}


@pytest.mark.parametrize("topology", ["one Redis", "Cluster"])
def test_each_route_costs_the_commands_the_scaling_guide_says(topology, request):
    from bench.commands import commands_per_route

    if topology == "Cluster":
        nodes = request.getfixturevalue("redis_cluster_of")("redis")
        nodes.flushall()
        request.addfinalizer(nodes.flushall)
        url = nodes.url
    else:
        request.getfixturevalue("redis_client")  # emptied before and after
        url = request.getfixturevalue("redis_url")
    counts = commands_per_route(url)
    for route, (sent, in_scripts) in ROUTE_COMMANDS.items():
        assert dict(counts[route][0]) == sent, route
        # /token extends the index's expiry only when the session's deadline passes it
        assert sum(counts[route][1].values()) in (in_scripts, in_scripts + 1), route
    # A login: the login limits' scripts, then one script of ours, two if the user has others.
    first, again = (
        counts["POST /login, the user's first session"][0],
        counts["POST /login, the user has another session"][0],
    )
    assert again["EVALSHA"] == first["EVALSHA"] + 1
