"""The service as the benchmark serves it: built by create_app, its store pre-filled.

The production server imports ``bench.app:create_bench_app`` in its worker. The worker fills
the store with BENCH_SESSIONS live sessions, mints the starting tokens for wrk into
BENCH_TOKENS (a JSON file), and records its memory before and after the fill. Nothing here
reaches into the service beyond what its own interfaces (store, tokens) offer.
"""

import json
import os
import resource
import time

import metrics
from auth import ACCESS
from server import create_app
from store import Policy

# Refresh-token chains for wrk to rotate through: bench/run.py's warm-up's and its measured
# run's, each more than its connections.
CHAINS = 128


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def create_bench_app():
    # Every chain belongs to the demo user, so its cap on sessions must not evict them; and
    # wrk logs in from one address far faster than any person, so the login limits are lifted.
    os.environ.setdefault("MAX_SESSIONS_PER_USER", str(2 * CHAINS))
    os.environ.setdefault("DEMO_USER_PASSWORD", "demo-password")  # a production server's rule
    for limit in ("LOGIN_RATE_LIMIT", "LOGIN_ACCOUNT_RATE_LIMIT", "LOGIN_ADDRESS_RATE_LIMIT"):
        os.environ.setdefault(limit, "1000000 per second")
    if os.environ.get("BENCH_METRICS") == "off":
        # What the metrics cost, against the same app without them (run.py --metrics): the
        # app as create_app builds it, but for metrics.init_app, which does nothing here.
        metrics.init_app = lambda app: None
    app = create_app()
    store, tokens = app.extensions["store"], app.extensions["tokens"]
    policy, users = app.extensions["policy"], app.extensions["users"]
    demo = users.get(users.authenticate(app.config["DEMO_USER_EMAIL"], "demo-password").id)
    sessions = int(os.environ.get("BENCH_SESSIONS", "0"))
    now = int(time.time())

    before = rss_bytes()
    started = time.perf_counter()
    fill(store, sessions, now + app.config["REFRESH_TOKEN_TTL"])
    fill_seconds = time.perf_counter() - started
    after = rss_bytes()

    chains = []
    for _ in range(CHAINS):
        session = policy.new_session(demo.id, now, "wrk", "127.0.0.1")
        store.start(session, now)
        chains.append(tokens.issue_refresh(session))
    long_lived, _ = tokens.issue_access(session, now)
    assert tokens.decode(long_lived, ACCESS)["sub"] == demo.id
    with open(os.environ["BENCH_TOKENS"], "w") as out:
        json.dump(
            {
                "refresh": chains,
                "access": long_lived,
                "sessions": sessions,
                "rss_before": before,
                "rss_after": after,
                "fill_seconds": fill_seconds,
            },
            out,
        )
    return app


def fill(store, sessions: int, expires_at: int) -> None:
    """Start ``sessions`` sessions of as many users, as that many logins would."""
    now = int(time.time())
    policy = Policy(lifetime=expires_at - now)
    for n in range(sessions):
        store.start(policy.new_session(f"bench-user-{n}", now, "bench", "127.0.0.1"), now)
