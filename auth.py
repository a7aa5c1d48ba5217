"""Passwords, minting and checking tokens, and the decorator that guards a route."""

import base64
import functools
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
from flask import current_app, g, request
from werkzeug.exceptions import HTTPException
from werkzeug.security import check_password_hash, generate_password_hash

# RFC 8725 §3.1: one algorithm, named by us, never taken from the token's header.
ALGORITHM = "HS256"
# RFC 8725 §3.11: each kind of token says what it is in its `typ` header (RFC 9068 names at+jwt).
ACCESS = "at+jwt"
REFRESH = "rt+jwt"
# RFC 8725 §3.1: bound the work a stranger's input can cost before any decoding.
MAX_TOKEN_LENGTH = 8192
REQUIRED_CLAIMS = ["exp", "iat", "sub", "jti", "iss", "aud"]
# RFC 8725 §3.10: headers that point at keys elsewhere; we never fetch one, and refuse them.
KEY_POINTER_HEADERS = {"jwk", "jku", "x5u", "x5c"}
# OWASP Password Storage Cheat Sheet: scrypt at N=2^15, r=8, p=3 (as strong as N=2^17, p=1,
# with a quarter of the memory per login).
PASSWORD_HASH_METHOD = "scrypt:32768:8:3"


class APIError(HTTPException):
    """An HTTP error with the snake_case code that the JSON error body carries."""

    def __init__(
        self, code: int, error: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(description=message)
        self.code = code
        self.error = error
        self.headers = headers or {}

    def get_headers(self, *args: Any) -> list[tuple[str, str]]:
        return list(self.headers.items())


class InvalidToken(Exception):
    """The token is not one of ours, or not any longer."""


def new_id() -> str:
    """Return a fresh random id (128 bits), for token ids and family ids."""
    return secrets.token_urlsafe(16)


@dataclass(frozen=True)
class User:
    id: str
    email: str
    password_hash: str


class Users:
    """The accounts that may log in; here only the demo account, if one is configured."""

    def __init__(self) -> None:
        self._by_email: dict[str, User] = {}
        # OWASP Authentication Cheat Sheet: an unknown email costs the same hashing work as a
        # wrong password, so the timing does not tell which emails have accounts.
        self._decoy_hash = generate_password_hash(new_id(), method=PASSWORD_HASH_METHOD)

    def add(self, email: str, password: str) -> User:
        """Create an account; emails are compared case-insensitively."""
        password_hash = generate_password_hash(password, method=PASSWORD_HASH_METHOD)
        user = User(str(len(self._by_email) + 1), email.lower(), password_hash)
        self._by_email[user.email] = user
        return user

    def authenticate(self, email: str, password: str) -> User | None:
        """Return the user these credentials belong to, or None."""
        user = self._by_email.get(email.lower())
        password_hash = user.password_hash if user else self._decoy_hash
        if check_password_hash(password_hash, password) and user:
            return user
        return None

    def get(self, user_id: str) -> User | None:
        """Return the user with this id, or None."""
        return next((user for user in self._by_email.values() if user.id == user_id), None)


@dataclass(frozen=True)
class Tokens:
    """Mints and checks the two kinds of token, each with its own key (RFC 8725 §3.12)."""

    access_secret: str
    refresh_secret: str
    access_ttl: int
    issuer: str
    audience: str
    leeway: int

    def issue_access(self, sub: str, now: int) -> str:
        """Return a new access token for the user ``sub``."""
        claims = self._claims(sub, now, now + self.access_ttl)
        return jwt.encode(claims, self.access_secret, ALGORITHM, headers={"typ": ACCESS})

    def issue_refresh(self, sub: str, family: str, jti: str, expires_at: int, now: int) -> str:
        """Return refresh token ``jti`` of ``family``; it dies with its family at ``expires_at``."""
        claims = self._claims(sub, now, expires_at) | {"jti": jti, "fam": family}
        return jwt.encode(claims, self.refresh_secret, ALGORITHM, headers={"typ": REFRESH})

    def csrf_token(self, family: str) -> str:
        """Return the CSRF token of a session, bound to it by the refresh key.

        OWASP CSRF Prevention Cheat Sheet, signed double-submit cookie: a forger cannot make
        one, and one stolen from another session does not fit this one.
        """
        message = f"csrf:{family}".encode()
        digest = hmac.new(self.refresh_secret.encode(), message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def decode(self, token: str, kind: str) -> dict[str, Any]:
        """Return the claims of a valid token of this kind, or raise InvalidToken."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("The token is longer than any token this service issues.")
        secret = self.access_secret if kind == ACCESS else self.refresh_secret
        try:
            decoded = jwt.decode_complete(
                token,
                secret,
                algorithms=[ALGORITHM],
                # RFC 8725 §3.8-3.9: the token must come from us and be meant for us.
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.PyJWTError as error:  # InvalidKeyError included: never a 500
            raise InvalidToken(f"{error}.".replace("..", ".")) from None
        header = decoded["header"]
        if header.get("typ") != kind:
            raise InvalidToken(
                f"This is not {'an access' if kind == ACCESS else 'a refresh'} token."
            )
        if KEY_POINTER_HEADERS & header.keys():
            raise InvalidToken("The token's header points at a key; this service never uses one.")
        return decoded["payload"]

    def _claims(self, sub: str, now: int, expires_at: int) -> dict[str, Any]:
        return {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": sub,
            "iat": now,
            "exp": expires_at,
            "jti": new_id(),
        }


def bearer_token() -> str | None:
    """Return the token of an ``Authorization: Bearer`` header (RFC 6750 §2.1), or None."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def token_required(view: Callable) -> Callable:
    """Let the request through only with a valid access token, and put its claims on ``g``."""

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
            g.claims = current_app.extensions["tokens"].decode(token, ACCESS)
            if current_app.extensions["store"].is_denied(g.claims["jti"]):
                raise InvalidToken("The token was revoked at logout.")
        except InvalidToken as error:
            raise APIError(
                401,
                "invalid_token",
                f"The access token is not valid: {error} Log in or refresh to get a new one.",
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            ) from None
        return view(**kwargs)

    return wrapped
