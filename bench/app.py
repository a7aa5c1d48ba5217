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

from auth import ACCESS, new_id
from server import create_app

CHAINS = 64  # refresh-token chains wrk rotates through; more than its connections


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def create_bench_app():
    app = create_app()
    store, tokens = app.extensions["store"], app.extensions["tokens"]
    sessions = int(os.environ.get("BENCH_SESSIONS", "0"))
    now = int(time.time())
    expires_at = now + app.config["REFRESH_TOKEN_TTL"]

    before = rss_bytes()
    started = time.perf_counter()
    fill(store, sessions, expires_at)
    fill_seconds = time.perf_counter() - started
    after = rss_bytes()

    chains = []
    for _ in range(CHAINS):
        family, jti = new_id(), new_id()
        store.start(family, jti, expires_at)
        chains.append(tokens.issue_refresh("1", family, jti, expires_at, now))
    long_lived = tokens.issue_access("1", now)
    assert tokens.decode(long_lived, ACCESS)["sub"] == "1"
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
    """Start ``sessions`` families, as that many logins would."""
    for _ in range(sessions):
        store.start(new_id(), new_id(), expires_at)
