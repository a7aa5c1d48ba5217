"""Where the time of one request goes, without a server or a network in the way.

    python bench/profile.py                 # microseconds per call of /token and /me
    python bench/profile.py --pyinstrument  # and the call tree of each (pip install pyinstrument)

Besides /token and /me with HS256 access tokens, it measures /me with EdDSA (Ed25519) access
tokens, the second service's offline check of one (examples/resource_server.py, verifying
against our JWKS), and one password check.

Calls the WSGI app directly, so the numbers are the service's own Python work: what the
production server adds on top is what bench/run.py measures.
"""

import argparse
import io
import json
import os
import secrets
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples import resource_server
from server import create_app

CALLS = 5000
LOGINS = 20
CONFIG = {
    "ACCESS_TOKEN_SECRET": secrets.token_urlsafe(32),
    "REFRESH_TOKEN_SECRET": secrets.token_urlsafe(32),
    "MAX_SESSIONS_PER_USER": "1000",
}


def environ(method: str, path: str, body: bytes = b"", token: str | None = None) -> dict:
    env = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "3000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.input_terminated": True,  # as granian's, which bench/run.py measures
        "wsgi.errors": sys.stderr,
        "CONTENT_LENGTH": str(len(body)),
        "CONTENT_TYPE": "application/json",
    }
    if token:
        env["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return env


def call(app, env: dict) -> tuple[str, bytes]:
    status = []
    body = b"".join(app(env, lambda s, headers: status.append(s)))
    return status[0], body


def demo_session(app):
    """Start a session of the demo user through the store, as a login would."""
    users, now = app.extensions["users"], int(time.time())
    demo = users.authenticate(app.config["DEMO_USER_EMAIL"], "demo-password")
    session = app.extensions["policy"].new_session(demo.id, now, "profile", "127.0.0.1")
    app.extensions["store"].start(session, now)
    return session


def token_calls(app, calls: int):
    """Rotate one session ``calls`` times, as a client refreshing in a loop would."""
    refresh = app.extensions["tokens"].issue_refresh(demo_session(app))
    for _ in range(calls):
        body = json.dumps({"refreshToken": refresh}).encode()
        status, answer = call(app, environ("POST", "/token", body))
        assert status.startswith("200"), answer
        refresh = json.loads(answer)["refreshToken"]


def me_calls(app, calls: int):
    access, _ = app.extensions["tokens"].issue_access(demo_session(app), int(time.time()))
    for _ in range(calls):
        status, answer = call(app, environ("GET", "/me", token=access))
        assert status.startswith("200"), answer


def eddsa_calls(calls: int) -> tuple[float, float]:
    """Microseconds per /me with an EdDSA access token, and per offline check of it elsewhere."""
    app = create_app(CONFIG | {"ACCESS_TOKEN_ALGORITHM": "EdDSA"})
    access, _ = app.extensions["tokens"].issue_access(demo_session(app), int(time.time()))
    jwks = app.extensions["tokens"].access_keys.jwks()
    other = resource_server.create_app(
        {"ACCESS_TOKEN_ALGORITHM": "EdDSA", "AUTH_SERVER_URL": "http://127.0.0.1:3000"}
    )
    other.extensions["jwks"].fetch_data = lambda: jwks  # as if fetched once, then cached
    timings = []
    for target, path in ((app, "/me"), (other, "/posts")):
        for _ in range(2):  # a warm-up pass, then the measured one
            started = time.perf_counter()
            for _ in range(calls):
                status, answer = call(target, environ("GET", path, token=access))
                assert status.startswith("200"), answer
        timings.append((time.perf_counter() - started) / calls * 1e6)
    return timings[0], timings[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pyinstrument", action="store_true")
    parser.add_argument("--calls", type=int, default=CALLS)
    args = parser.parse_args()
    app = create_app(CONFIG)
    # The audit lines go to /dev/null: their cost is kept, not their noise.
    sys.stderr = open(os.devnull, "w")
    for name, calls in (("POST /token", token_calls), ("GET /me", me_calls)):
        calls(app, 200)  # warm up
        started = time.perf_counter()
        calls(app, args.calls)
        per_call = (time.perf_counter() - started) / args.calls * 1e6
        print(f"{name}: {per_call:.0f} us per call of the WSGI app")
        if args.pyinstrument:
            from pyinstrument import Profiler

            with Profiler(interval=0.0001) as profiler:
                calls(app, args.calls)
            print(profiler.output_text(color=False, show_all=False))
    eddsa_me, offline_check = eddsa_calls(args.calls)
    print(f"GET /me, EdDSA access token: {eddsa_me:.0f} us per call of the WSGI app")
    print(f"GET /posts of examples/resource_server.py, offline EdDSA check: {offline_check:.0f} us")
    users = app.extensions["users"]
    started = time.perf_counter()
    for _ in range(LOGINS):
        assert users.authenticate(app.config["DEMO_USER_EMAIL"], "demo-password")
    per_login = (time.perf_counter() - started) / LOGINS * 1e3
    print(f"password check at login: {per_login:.1f} ms per call")


if __name__ == "__main__":
    main()
