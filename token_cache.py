"""Verified access tokens, remembered: a token already checked skips its signature check.

What Envoy's ``jwt_authn`` filter (its ``jwt_cache_config``) and API gateways do: each process
keeps a bounded cache keyed by the exact token string, holding the claims its signature check
returned, and never past the token's own ``exp``. The cache is consulted only after the
token's length and shape are checked, and only its header, signature and claims checks are
skipped: the session check (``auth.live_session``) still runs on every request, so a cached
token opens nothing that logging out, reuse or a removed account has closed. A token that
fails its check is never cached, and an entry counts only while the key that verified it is
still one the ring holds. Read auth.py first; this file is only a speed-up.
"""

import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any

from flask import Flask

from auth import ACCESS, MAX_TOKEN_LENGTH, Tokens
from keys import Key, KeyRing

# At most this many tokens per process. An entry is one of our own tokens (a few hundred bytes,
# since only a token whose signature checked is kept) and its claims: about 1.5 KB, so the
# whole cache stays under about 6 MB whatever clients send.
MAX_ENTRIES = 4096


class VerifiedTokens:
    """At most ``max_entries`` verified tokens and their claims, each until its ``exp``."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        # token -> (the key that verified it, its exp, its claims); in insertion order, so
        # the first entry is the oldest.
        self._entries: dict[str, tuple[Key, int, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: str, ring: KeyRing, now: float) -> dict[str, Any] | None:
        """Return the claims of ``token`` if a key ``ring`` holds verified it, before its exp."""
        entry = self._entries.get(token)
        if entry is None:
            return None
        verified_by, expires_at, claims = entry
        if now >= expires_at:
            with self._lock:
                self._entries.pop(token, None)
            return None
        # A key is the process's own object: a ring that no longer holds it never matches.
        return claims if ring.find(verified_by.kid) is verified_by else None

    def put(self, token: str, key: Key, claims: dict[str, Any], now: float) -> None:
        """Remember the claims ``key`` verified, unless the token is already past its exp."""
        expires_at = claims["exp"]
        if now >= expires_at:  # let through by the leeway: checked afresh each time
            return
        with self._lock:
            entries = self._entries
            while entries and (
                len(entries) >= self.max_entries or next(iter(entries.values()))[1] <= now
            ):
                del entries[next(iter(entries))]  # the oldest, or one that has expired
            entries[token] = (key, expires_at, claims)


@dataclass(frozen=True)
class CachingTokens(Tokens):
    """Tokens that remember the access tokens they verified."""

    verified: VerifiedTokens = field(default_factory=VerifiedTokens)

    def decode(self, token: str, kind: str) -> dict[str, Any]:
        # A refresh token is spent at once: only access tokens are worth remembering.
        if kind == ACCESS and len(token) <= MAX_TOKEN_LENGTH and token.count(".") == 2:
            claims = self.verified.get(token, self.access_keys, time.time())
            if claims is not None:
                return dict(claims)  # the caller's own copy
        return super().decode(token, kind)

    def verify(self, token: str, ring: KeyRing, key: Key) -> dict[str, Any]:
        claims = super().verify(token, ring, key)  # raises InvalidToken: never cached
        if ring is self.access_keys:
            self.verified.put(token, key, claims, time.time())
        return dict(claims)


def init_app(app: Flask) -> None:
    """Give the app Tokens that remember verified access tokens; after ``auth.init_app``."""
    tokens = app.extensions["tokens"]
    app.extensions["tokens"] = CachingTokens(
        **{part.name: getattr(tokens, part.name) for part in fields(Tokens)}
    )
