"""Tokens: minting and checking both kinds, and the decorator that guards a route.

An access token is short-lived and opens the API; a refresh token lives as long as its
session and only buys new access tokens at ``POST /token``. Each kind has its own key and
says what it is in its header, so one can never pass for the other.
"""

import base64
import functools
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
from flask import Flask, current_app, g, request

from errors import APIError, after_colon
from keys import Key, KeyRing, eddsa_ring, hmac_ring
from store import Session, get_store, new_id
from users import User, get_users

# RFC 8725 §3.11: each kind of token says what it is in its `typ` header (RFC 9068 names at+jwt).
ACCESS = "at+jwt"
REFRESH = "rt+jwt"
KIND_NAMES = {ACCESS: "an access token", REFRESH: "a refresh token"}
# RFC 9068 §2.2 requires client_id: every client here (the page, curl, Postman) is this
# service's own first-party client, with no registration of its own, so one id names them all.
CLIENT_ID = "first-party"
# RFC 8725 §3.1: bound the work a stranger's input can cost before any decoding.
MAX_TOKEN_LENGTH = 8192
REQUIRED_CLAIMS = ["exp", "iat", "sub", "sid", "jti", "iss", "aud"]
IDS = ("sub", "sid", "jti")  # the user's, the session's and the token's own
# RFC 8725 §3.10: headers that point at keys elsewhere; we never fetch one, and refuse them.
KEY_POINTER_HEADERS = {"jwk", "jku", "x5u", "x5c"}
# Our own words for PyJWT's refusals: a message never echoes what a stranger put in a token.
REFUSALS = [
    (jwt.ExpiredSignatureError, "The token has expired."),
    (jwt.ImmatureSignatureError, "The token is not valid yet."),
    (jwt.InvalidSignatureError, "The token's signature does not match."),
    (jwt.InvalidAudienceError, "The token is not meant for this service."),
    (jwt.InvalidIssuerError, "The token was not issued by this service."),
    (jwt.InvalidAlgorithmError, "The token is signed with an algorithm this service refuses."),
    (jwt.DecodeError, "The token is malformed."),
]


class InvalidToken(Exception):
    """The token is not one of ours, or not any longer."""


class SessionEnded(InvalidToken):
    """The token is ours, but its session, or its account, is gone."""


@dataclass(frozen=True)
class Tokens:
    """Mints and checks the two kinds of token, each with its own keys (RFC 8725 §3.12)."""

    access_keys: KeyRing
    refresh_keys: KeyRing
    access_ttl: int
    issuer: str
    audience: str
    leeway: int

    def issue_access(self, session: Session, now: int) -> tuple[str, int]:
        """Return a new access token of ``session`` and its lifetime: never past the session's."""
        expires_at = min(now + self.access_ttl, session.expires_at)
        claims = self._claims(session, new_id(), now, expires_at) | {"client_id": CLIENT_ID}
        return self._sign(claims, self.access_keys, ACCESS), expires_at - now

    def issue_refresh(self, session: Session) -> str:
        """Return the session's current refresh token; the same string each time it is asked.

        HS256 is deterministic, so the token follows from the session's stored jti and iat:
        a retry within the grace window gets exactly what the first answer had.
        """
        claims = self._claims(session, session.jti, session.last_used_at, session.expires_at)
        return self._sign(claims, self.refresh_keys, REFRESH)

    def decode(self, token: str, kind: str) -> dict[str, Any]:
        """Return the claims of a valid token of this kind, or raise InvalidToken."""
        ring, key = self.key_for(token, kind)
        return self.verify(token, ring, key)

    def key_for(self, token: str, kind: str) -> tuple[KeyRing, Key]:
        """Check the token's length and header; return the ring and key that must verify it."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("The token is longer than any token this service issues.")
        header = unverified_header(token)
        typ = header.get("typ")
        if typ != kind:
            if isinstance(typ, str) and typ in KIND_NAMES:  # ours, of the other kind
                raise InvalidToken(f"This is {KIND_NAMES[typ]}; send {KIND_NAMES[kind]}.")
            raise InvalidToken(f"This is not {KIND_NAMES[kind]}.")
        if KEY_POINTER_HEADERS & header.keys():
            raise InvalidToken("The token's header points at a key; this service never uses one.")
        ring = self.access_keys if kind == ACCESS else self.refresh_keys
        key = ring.find(header.get("kid"))
        if key is None:
            # RFC 7515 §4.1.4: the kid names the key; one we do not hold (or retired) fails.
            raise InvalidToken("The token is signed with a key this service does not hold.")
        return ring, key

    def verify(self, token: str, ring: KeyRing, key: Key) -> dict[str, Any]:
        """Check the token's signature with ``key`` and its claims; return them."""
        try:
            claims = jwt.decode(
                token,
                key.public,
                algorithms=[ring.algorithm],  # RFC 8725 §3.1: pinned, never from the header
                # RFC 8725 §3.8-3.9: the token must come from us and be meant for us.
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.MissingRequiredClaimError as error:  # the claim's name is ours, not theirs
            raise InvalidToken(f"The token lacks the '{error.claim}' claim.") from None
        except jwt.PyJWTError as error:  # InvalidKeyError included: never a 500
            message = next((text for kind_, text in REFUSALS if isinstance(error, kind_)), None)
            raise InvalidToken(message or "The token is not valid.") from None
        # Only a key holder gets this far. RFC 7519 §2: exp and iat are JSON numbers (PyJWT
        # takes "123" too); the ids are ours, ASCII: a lone surrogate could reach no store.
        if not (
            all(type(claims[name]) in (int, float) for name in ("exp", "iat"))
            and all(type(claims[name]) is str and claims[name].isascii() for name in IDS)
        ):
            raise InvalidToken("The token's claims are not of the right type.")
        return claims

    def _claims(self, session: Session, jti: str, now: int, expires_at: int) -> dict[str, Any]:
        return {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": session.user_id,
            "sid": session.id,
            "iat": now,
            "exp": expires_at,
            "jti": jti,
        }

    @staticmethod
    def _sign(claims: dict[str, Any], ring: KeyRing, kind: str) -> str:
        key = ring.current
        assert key.private is not None  # the current key of a ring always signs
        return jwt.encode(
            claims, key.private, ring.algorithm, headers={"typ": kind, "kid": key.kid}
        )


def unverified_header(token: str) -> dict[str, Any]:
    """Read a token's header before its signature is checked: only to choose the key.

    jwt.decode checks the whole token again, strictly; reading just the first segment here
    (not PyJWT's get_unverified_header) keeps the payload from being decoded twice.
    """
    segment = token.partition(".")[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):  # binascii.Error and UnicodeDecodeError included
        raise InvalidToken("The token is malformed.") from None
    if not isinstance(header, dict):
        raise InvalidToken("The token is malformed.")
    return header


def same_text(sent: str, expected: str) -> bool:
    """Compare two strings in constant time, whatever characters a client put in them."""
    # compare_digest refuses non-ASCII str; header and cookie values may hold any character.
    sent_bytes, expected_bytes = (
        text.encode("utf-8", "surrogatepass") for text in (sent, expected)
    )
    return hmac.compare_digest(sent_bytes, expected_bytes)


def bearer_token() -> str | None:
    """Return the token of an ``Authorization: Bearer`` header (RFC 6750 §2.1), or None."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def invalid_access_token(
    message: str, remedy: str = "Log in or refresh to get a new one."
) -> APIError:
    """Return the 401 of an access token that does not count (RFC 6750 §3.1)."""
    return APIError(
        401,
        "invalid_token",
        f"The access token is not valid: {after_colon(message)} {remedy}",
        {"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


def live_session(claims: dict[str, Any]) -> tuple[Session, User]:
    """Return the live session a valid token names, and its account; else raise SessionEnded."""
    # OWASP JWT Cheat Sheet (token revocation): a token lives only while its session does;
    # one lookup, and no deny list to keep.
    session = get_store().get(claims["sid"], claims["sub"], int(time.time()))
    if session is None:
        raise SessionEnded("Its session has ended.")
    return session, live_account(session)


def live_account(session: Session) -> User:
    """Return the account of a session; raise SessionEnded if it was removed meanwhile."""
    user = get_users().get(session.user_id)
    if user is None:
        raise SessionEnded("Its account no longer exists.")
    return user


def token_required(view: Callable) -> Callable:
    """Let the request through only with a live session's access token of an account that
    still exists; put the claims, the session and the user on ``g``."""

    @functools.wraps(view)
    def wrapped(**kwargs: Any) -> Any:
        token = bearer_token()
        if token is None:
            # RFC 6750 §3.1: a request without credentials gets the challenge, no error code.
            raise APIError(
                401,
                "missing_token",
                "Send an access token in the 'Authorization: Bearer <token>' header.",
                {"WWW-Authenticate": 'Bearer realm="api"'},
            )
        try:
            g.claims = get_tokens().decode(token, ACCESS)
            _, g.user = live_session(g.claims)
        except SessionEnded as error:
            raise invalid_access_token(str(error), "Log in again.") from None
        except InvalidToken as error:
            raise invalid_access_token(str(error)) from None
        return view(**kwargs)

    return wrapped


def init_app(app: Flask) -> None:
    """Give the app its Tokens: the keys of each kind, from the settings."""
    config = app.config
    if config["ACCESS_TOKEN_ALGORITHM"] == "HS256":
        access_keys = hmac_ring(
            config["ACCESS_TOKEN_SECRET"], config["ACCESS_TOKEN_PREVIOUS_SECRETS"]
        )
    else:
        access_keys = eddsa_ring(
            config["ACCESS_TOKEN_PRIVATE_KEY_FILE"],
            config["ACCESS_TOKEN_PREVIOUS_PUBLIC_KEY_FILES"],
            app.logger,
            # A key made per process serves one development process; never production's workers.
            allow_generated=config["APP_ENV"] == "development" and not config["SERVER"],
        )
    app.extensions["tokens"] = Tokens(
        access_keys=access_keys,
        refresh_keys=hmac_ring(
            config["REFRESH_TOKEN_SECRET"], config["REFRESH_TOKEN_PREVIOUS_SECRETS"]
        ),
        access_ttl=config["ACCESS_TOKEN_TTL"],
        issuer=config["JWT_ISSUER"],
        audience=config["JWT_AUDIENCE"],
        leeway=config["JWT_LEEWAY"],
    )


def get_tokens() -> Tokens:
    """Return the app's Tokens."""
    return current_app.extensions["tokens"]
