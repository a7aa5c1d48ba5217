"""The login limits: how many password guesses are allowed.

Three moving-window limits, counted *before* the password is checked, so that guesses sent
at the same moment cannot slip past a check made before any of them was counted:

- per email and client address (``LOGIN_RATE_LIMIT``): one address guessing one account;
- per account, across all addresses (``LOGIN_ACCOUNT_RATE_LIMIT``): a botnet on one account;
- per address, across all emails (``LOGIN_ADDRESS_RATE_LIMIT``): password spraying.

A successful login clears the first two (the user knows the password); never the third, or
one valid account would reset it. The counters live where the sessions do: in this process,
or in Redis for every worker.
"""

import math
import time
from dataclasses import dataclass

from flask import Flask, current_app
from limits import RateLimitItem, parse
from limits.storage import MemoryStorage, Storage
from limits.strategies import MovingWindowRateLimiter

from errors import APIError


class Throttled(APIError):
    """The 429 of a full limit; ``limit`` names it for the audit line, never for the client."""

    limit = ""


@dataclass(frozen=True)
class Limit:
    """One moving-window limit and its name."""

    name: str  # named in the audit line, never in the answer
    item: RateLimitItem


def throttled(
    limiter: MovingWindowRateLimiter, limit: Limit, identifiers: tuple[str, ...], what: str
) -> Throttled:
    """Return the 429 of a full limit, saying when to retry (RFC 6585 §4: Retry-After)."""
    stats = limiter.get_window_stats(limit.item, limit.name, *identifiers)
    retry_after = max(1, math.ceil(stats.reset_time - time.time()))
    error = Throttled(
        429,
        "too_many_requests",
        f"Too many failed {what}; retry in {in_words(retry_after)}.",
        {"Retry-After": str(retry_after)},
    )
    error.limit = limit.name
    return error


def in_words(seconds: int) -> str:
    """Say a wait as a person would: "15 minutes", "1 minute", "40 seconds"."""
    if seconds < 60:
        return f"{seconds} second{'s' * (seconds != 1)}"
    minutes = math.ceil(seconds / 60)
    return f"{minutes} minute{'s' * (minutes != 1)}"


class LoginGuard:
    """Counts login attempts against the three limits."""

    def __init__(self, storage: Storage, limits: dict[str, str]) -> None:
        self._limiter = MovingWindowRateLimiter(storage)
        self._limits = {name: Limit(name, parse(text)) for name, text in limits.items()}

    def count_attempt(self, email: str, address: str) -> None:
        """Count one login attempt on every limit; raise the 429 of the first that is full."""
        # NIST SP 800-63B §5.2.2 and OWASP Authentication Cheat Sheet: limit failed attempts.
        address_limit, *limits = self._identifiers(email.lower(), address)
        # A full address is refused before anything is counted: a flood of new emails from
        # one address adds no counters of its own.
        if not self._limiter.test(address_limit[0].item, "address", address):
            raise throttled(self._limiter, *address_limit, "logins")
        # Then the most specific first, so that an attempt refused for its email and address
        # is not counted against the account: one address cannot lock an account out.
        for limit, identifiers in [*limits, address_limit]:
            # hit() adds the attempt only if the window has room, in one atomic step.
            if not self._limiter.hit(limit.item, limit.name, *identifiers):
                raise throttled(self._limiter, limit, identifiers, "logins")

    def succeeded(self, email: str, address: str) -> None:
        """Forget this email's failures, from this address and from everywhere."""
        for limit, identifiers in self._identifiers(email.lower(), address):
            if limit.name != "address":
                self._limiter.clear(limit.item, limit.name, *identifiers)

    def _identifiers(self, email: str, address: str) -> list[tuple[Limit, tuple[str, ...]]]:
        keys = {"address": (address,), "email_address": (email, address), "account": (email,)}
        return [(self._limits[name], keys[name]) for name in keys]


def init_app(app: Flask) -> None:
    """Give the app its login guard, counting where the sessions live (after the store)."""
    counters = app.extensions.setdefault("counters", MemoryStorage())
    app.extensions["login_guard"] = LoginGuard(
        counters,
        {
            "email_address": app.config["LOGIN_RATE_LIMIT"],
            "account": app.config["LOGIN_ACCOUNT_RATE_LIMIT"],
            "address": app.config["LOGIN_ADDRESS_RATE_LIMIT"],
        },
    )


def get_login_guard() -> LoginGuard:
    """Return the app's login guard."""
    return current_app.extensions["login_guard"]
