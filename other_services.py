"""Other services: how they trust our access tokens.

Skip this file on a first read. Two ways, one RFC each:
- ``GET /.well-known/jwks.json`` publishes the public keys (RFC 7517), so a service checks
  EdDSA access tokens offline;
- ``POST /introspect`` (RFC 7662) tells a registered client whether a token is active, for
  services that would rather ask. Clients are listed in INTROSPECTION_CLIENTS and limited
  like logins: per client and address, per client, and per address.
"""

from typing import Any
from urllib.parse import unquote_plus

from flask import Blueprint, Response, current_app, jsonify, request
from flask.blueprints import BlueprintSetupState
from limits import parse
from limits.storage import Storage
from limits.strategies import MovingWindowRateLimiter

from auth import ACCESS, CLIENT_ID, REFRESH, InvalidToken, get_tokens, live_session, same_text
from errors import APIError
from throttle import Limit, throttled
from web import audit, client_address, form_body

bp = Blueprint("other_services", __name__)


class ClientGuard:
    """Counts failed client authentications at /introspect against three limits."""

    def __init__(self, storage: Storage, limits: dict[str, str]) -> None:
        self._limiter = MovingWindowRateLimiter(storage)
        self._limits = {name: Limit(name, parse(text)) for name, text in limits.items()}

    def check(self, client_id: str | None, address: str, authenticated: bool) -> None:
        """Count a failure, atomically and before it is answered; refuse any full limit.

        RFC 6749 §2.3.1 and NIST SP 800-63B §5.2.2, as at /login: guesses sent at once are
        each counted before any is answered, so none slips past the limit. A client that
        authenticated is only checked, never counted: its secret is long and random, and
        counting a busy client's own calls would throttle it.
        """
        for limit, identifiers in self._identifiers(client_id, address):
            if authenticated:
                room = self._limiter.test(limit.item, limit.name, *identifiers)
            else:  # hit() adds the failure only if the window has room, in one atomic step
                room = self._limiter.hit(limit.item, limit.name, *identifiers)
            if not room:
                raise throttled(self._limiter, limit, identifiers, "authentications")

    def _identifiers(
        self, client_id: str | None, address: str
    ) -> list[tuple[Limit, tuple[str, ...]]]:
        # A counter per client only for clients that exist, so made-up ids cost no memory.
        keys: dict[str, tuple[str, ...]] = {}
        if client_id is not None:
            keys = {"client_pair": (client_id, address), "client": (client_id,)}
        keys["client_address"] = (address,)
        return [(self._limits[name], keys[name]) for name in keys]


@bp.record_once
def setup(state: BlueprintSetupState) -> None:
    """Give the app its client guard, counting where the login limits do."""
    config = state.app.config
    state.app.extensions["client_guard"] = ClientGuard(
        state.app.extensions["counters"],
        {
            "client_pair": config["LOGIN_RATE_LIMIT"],
            "client": config["LOGIN_ACCOUNT_RATE_LIMIT"],
            "client_address": config["LOGIN_ADDRESS_RATE_LIMIT"],
        },
    )


def get_client_guard() -> ClientGuard:
    """Return the app's guard of introspection clients."""
    return current_app.extensions["client_guard"]


@bp.get("/.well-known/jwks.json")
def jwks() -> Response:
    """Publish the public keys that verify access tokens (RFC 7517), for other services."""
    response = jsonify(get_tokens().access_keys.jwks())
    response.headers["Cache-Control"] = "public, max-age=300"
    return response


@bp.post("/introspect")
def introspect() -> Response:
    """Tell a registered client whether a token is active, and whose (RFC 7662)."""
    clients = current_app.config["INTROSPECTION_CLIENTS"]
    if not clients:
        raise APIError(404, "not_found", "Token introspection is not enabled on this service.")
    authenticate_client(clients)
    form = form_body()
    token = form.get("token")
    if not token:
        raise APIError(400, "invalid_request", "Send the token in the form field 'token'.")
    kinds = [ACCESS, REFRESH]
    if form.get("token_type_hint") == "refresh_token":
        kinds.reverse()  # RFC 7662 §2.1: the hint only orders the search
    answer = next(filter(None, (active_claims(token, kind) for kind in kinds)), None)
    return jsonify(answer or {"active": False})


def authenticate_client(clients: dict[str, str]) -> None:
    """Let only a client of INTROSPECTION_CLIENTS through, with HTTP Basic (RFC 7662 §2.1)."""
    sent_id, sent_secret = basic_credentials()
    client_id = sent_id if sent_id in clients else None  # made-up ids get no counter
    authenticated = client_id is not None and same_text(sent_secret, clients[client_id])
    get_client_guard().check(client_id, client_address(), authenticated)
    if authenticated:
        return
    audit("introspection_client_refused")
    raise APIError(
        401,
        "invalid_client",
        "Authenticate with HTTP Basic as a client listed in INTROSPECTION_CLIENTS.",
        {"WWW-Authenticate": 'Basic realm="introspection"'},
    )


def basic_credentials() -> tuple[str | None, str]:
    """Return the client id and secret of HTTP Basic, decoded as RFC 6749 §2.3.1 says."""
    try:
        credentials = request.authorization
    except ValueError:  # Basic credentials that are not base64 of text
        return None, ""
    if credentials is None or credentials.type != "basic":
        return None, ""
    # RFC 6749 §2.3.1: the id and secret are form-urlencoded before they are joined by ':'.
    return unquote_plus(credentials.username or ""), unquote_plus(credentials.password or "")


def active_claims(token: str, kind: str) -> dict[str, Any] | None:
    """Return the introspection answer for a live token of this kind, or None."""
    try:
        claims = get_tokens().decode(token, kind)
        session, _ = live_session(claims)
    except InvalidToken:  # not ours, or its session or account is gone
        return None
    if kind == REFRESH and claims["jti"] != session.jti:
        return None  # spent: only a session's current refresh token is active
    token_type = "access_token" if kind == ACCESS else "refresh_token"
    fields = ("sub", "sid", "exp", "iat", "jti", "iss", "aud")
    # RFC 7662 §2.2: client_id, the client the token was issued to; one for both kinds here.
    answer = {"active": True, "token_type": token_type, "client_id": CLIENT_ID}
    return answer | {name: claims[name] for name in fields}
