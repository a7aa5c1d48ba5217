"""The same routes written the Flask-JWT-Extended way: what the usual extension costs.

    granian --interface wsgi --factory --working-dir bench/peers flask_jwt_extended_app:create_app

POST /login mints both tokens and keeps the refresh token's jti in a set; POST /token reads
the refresh token from the JSON key "refreshToken" (``@jwt_required(refresh=True)``) and
answers a new access token, without rotation; GET /me takes ``Authorization: Bearer``. The
set of live refresh jtis is checked by ``token_in_blocklist_loader`` on every protected
request. Flask-JWT-Extended signs both kinds with one key, ACCESS_TOKEN_SECRET, and its
tokens carry more claims (sub, jti, type, fresh, nbf, iat, exp) than the Express original's.
SEED_SESSIONS=N pre-fills N refresh jtis.
"""

import hashlib
import hmac
import os
from datetime import timedelta

from flask import Flask, jsonify, request
from flask_jwt_extended import (
    JWTManager,
    create_access_token,
    create_refresh_token,
    get_jti,
    get_jwt,
    get_jwt_identity,
    jwt_required,
)

DEMO_USER = {"id": "u0000000", "email": "demo@example.com", "password": "demo-password"}


def create_app() -> Flask:
    """Build the app, its set of live refresh jtis filled with SEED_SESSIONS of them."""
    app = Flask(__name__)
    app.config["JWT_SECRET_KEY"] = os.environ["ACCESS_TOKEN_SECRET"]
    app.config["JWT_ACCESS_TOKEN_EXPIRES"] = timedelta(minutes=15)
    app.config["JWT_REFRESH_TOKEN_EXPIRES"] = False  # as the original's, which never expire
    app.config["JWT_TOKEN_LOCATION"] = ["headers", "json"]
    app.config["JWT_REFRESH_JSON_KEY"] = "refreshToken"
    jwt = JWTManager(app)
    live_jtis: set[str] = set()

    @jwt.token_in_blocklist_loader
    def refresh_not_live(jwt_header: dict, jwt_payload: dict) -> bool:
        return jwt_payload["type"] == "refresh" and jwt_payload["jti"] not in live_jtis

    with app.app_context():
        for number in range(1, int(os.environ.get("SEED_SESSIONS", "0")) + 1):
            live_jtis.add(get_jti(create_refresh_token(identity=f"u{number:07d}")))

    @app.post("/login")
    def login():
        body = request.get_json(silent=True) or {}
        user = authenticate_user(body.get("email"), body.get("password"))
        if not user:
            return "Unauthorized", 401
        refresh_token = create_refresh_token(identity=user["id"])
        live_jtis.add(get_jti(refresh_token))
        return jsonify(
            accessToken=create_access_token(identity=user["id"]), refreshToken=refresh_token
        )

    @app.post("/token")
    @jwt_required(refresh=True)
    def token():
        return jsonify(accessToken=create_access_token(identity=get_jwt_identity()))

    @app.post("/logout")
    @jwt_required(refresh=True)
    def logout():
        live_jtis.discard(get_jwt()["jti"])
        return "", 204

    @app.get("/me")
    @jwt_required()
    def me():
        return jsonify(id=get_jwt_identity())

    return app


def authenticate_user(email: str | None, password: str | None) -> dict | None:
    """Check the one demo user, as the Express peer does; /login is not what is measured."""
    # Digests of equal length, compared in constant time; `&` so both comparisons run.
    ok = hmac.compare_digest(sha256(email), sha256(DEMO_USER["email"])) & hmac.compare_digest(
        sha256(password), sha256(DEMO_USER["password"])
    )
    return {"id": DEMO_USER["id"]} if ok else None


def sha256(text: str | None) -> bytes:
    return hashlib.sha256(str(text).encode()).digest()
