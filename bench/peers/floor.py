"""The floor: the least a Flask + PyJWT app can do for these routes, to measure ours against.

    granian --interface wsgi --factory --working-dir bench/peers floor:create_app

POST /token is one verify and one sign, GET /me one verify; the store is a dict of live
refresh jtis; PyJWT is called the plain way its documentation shows, with string keys.
No rotation, no deny list, no audit, no throttling, no error shape: everything the
service adds on top of this is what the benchmark's ratio to the floor shows.
SEED_SESSIONS=N pre-fills N sessions.
"""

import hashlib
import hmac
import os
import secrets
import time

import jwt
from flask import Flask, abort, jsonify, request

DEMO_USER = {"id": "u0000000", "email": "demo@example.com", "password": "demo-password"}


def create_app() -> Flask:
    """Build the app, its dict of sessions filled with SEED_SESSIONS of them."""
    app = Flask(__name__)
    access_key = os.environ["ACCESS_TOKEN_SECRET"]
    refresh_key = os.environ["REFRESH_TOKEN_SECRET"]
    sessions = {  # refresh jti -> user id
        secrets.token_urlsafe(16): f"u{number:07d}"
        for number in range(1, int(os.environ.get("SEED_SESSIONS", "0")) + 1)
    }

    def access_token(user_id: str) -> str:
        claims = {"sub": user_id, "exp": int(time.time()) + 900}
        return jwt.encode(claims, access_key, algorithm="HS256")

    @app.post("/login")
    def login():
        body = request.get_json()
        if not authenticate_user(body.get("email"), body.get("password")):
            abort(401)
        jti = secrets.token_urlsafe(16)
        sessions[jti] = DEMO_USER["id"]
        refresh_token = jwt.encode({"sub": DEMO_USER["id"], "jti": jti}, refresh_key)
        return jsonify(accessToken=access_token(DEMO_USER["id"]), refreshToken=refresh_token)

    @app.post("/token")
    def token():
        try:
            claims = jwt.decode(
                request.get_json().get("refreshToken", ""), refresh_key, algorithms=["HS256"]
            )
        except jwt.PyJWTError:
            abort(403)
        if claims.get("jti") not in sessions:
            abort(403)
        return jsonify(accessToken=access_token(claims["sub"]))

    @app.post("/logout")
    def logout():
        try:
            claims = jwt.decode(
                request.get_json().get("refreshToken", ""), refresh_key, algorithms=["HS256"]
            )
        except jwt.PyJWTError:
            return "", 204
        sessions.pop(claims.get("jti"), None)
        return "", 204

    @app.get("/me")
    def me():
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        try:
            claims = jwt.decode(token, access_key, algorithms=["HS256"])
        except jwt.PyJWTError:
            abort(401)
        return jsonify(id=claims["sub"])

    return app


def authenticate_user(email: str | None, password: str | None) -> bool:
    """Check the one demo user, as the Express peer does; /login is not what is measured."""
    # Digests of equal length, compared in constant time; `&` so both comparisons run.
    return bool(
        hmac.compare_digest(sha256(email), sha256(DEMO_USER["email"]))
        & hmac.compare_digest(sha256(password), sha256(DEMO_USER["password"]))
    )


def sha256(text: str | None) -> bytes:
    return hashlib.sha256(str(text).encode()).digest()
