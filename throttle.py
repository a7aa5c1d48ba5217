"""The login guard: how many password guesses are allowed, and how many are hashed at once.

Three moving-window limits, counted *before* the password is checked, so that guesses sent
at the same moment cannot slip past a check made before any of them was counted:

- per email and client address (``LOGIN_RATE_LIMIT``): one address guessing one account;
- per account, across all addresses (``LOGIN_ACCOUNT_RATE_LIMIT``): a botnet on one account;
- per address, across all emails (``LOGIN_ADDRESS_RATE_LIMIT``): password spraying.

A successful login clears the first two (the user knows the password); never the third, or
one valid account would reset it. Introspection clients (``/introspect``) have the same three
limits of their own, on failed authentications only. The counters live where
the sessions do: in this process, or in Redis for every worker.

Password checks are memory-hard (19 MiB each), so they run on a few threads of their own:
that bounds how many run at once, and also how much memory stays behind, since the C
allocator keeps an arena per thread that has hashed.
"""

import math
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from limits import RateLimitItem, parse
from limits.storage import Storage
from limits.strategies import MovingWindowRateLimiter

from errors import APIError

# Seconds a login waits for a hashing slot before it is told to come back.
SLOT_WAIT = 2
T = TypeVar("T")


class Throttled(APIError):
    """The 429 of a full limit; ``limit`` names it for the audit line, never for the client."""

    limit = ""


@dataclass(frozen=True)
class Limit:
    """One moving-window limit and its name."""

    name: str  # named in the audit line, never in the answer
    item: RateLimitItem


class LoginGuard:
    """Counts login attempts against the three limits and hands out hashing slots."""

    def __init__(self, storage: Storage, limits: dict[str, str], max_concurrent: int) -> None:
        self._limiter = MovingWindowRateLimiter(storage)
        self._limits = {name: Limit(name, parse(text)) for name, text in limits.items()}
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._hashers = ThreadPoolExecutor(max_concurrent, thread_name_prefix="password-check")
        weakref.finalize(self, self._hashers.shutdown, wait=False)

    def count_attempt(self, email: str, address: str) -> None:
        """Count one login attempt on every limit; raise the 429 of the first that is full."""
        # NIST SP 800-63B §5.2.2 and OWASP Authentication Cheat Sheet: limit failed attempts.
        address_limit, *limits = self._identifiers(email.lower(), address)
        # A full address is refused before anything is counted: a flood of new emails from
        # one address adds no counters of its own.
        if not self._limiter.test(address_limit[0].item, "address", address):
            raise self._throttled(*address_limit)
        # Then the most specific first, so that an attempt refused for its email and address
        # is not counted against the account: one address cannot lock an account out.
        for limit, identifiers in [*limits, address_limit]:
            # hit() adds the attempt only if the window has room, in one atomic step.
            if not self._limiter.hit(limit.item, limit.name, *identifiers):
                raise self._throttled(limit, identifiers)

    def succeeded(self, email: str, address: str) -> None:
        """Forget this email's failures, from this address and from everywhere."""
        for limit, identifiers in self._identifiers(email.lower(), address):
            if limit.name != "address":
                self._limiter.clear(limit.item, limit.name, *identifiers)

    def check_client(self, client_id: str | None, address: str) -> None:
        """Refuse a client that failed too often, without counting this call.

        Like logins: per client and address, per client, and per address. Only failures
        count: a client's secret is long and random, so guesses racing the count gain
        nothing, while counting a busy client's own valid calls would throttle it.
        """
        for limit, identifiers in self._client_identifiers(client_id, address):
            if not self._limiter.test(limit.item, limit.name, *identifiers):
                raise self._throttled(limit, identifiers)

    def client_failed(self, client_id: str | None, address: str) -> None:
        """Count a failed client authentication: ``client_id`` is None for an unknown one."""
        for limit, identifiers in self._client_identifiers(client_id, address):
            self._limiter.hit(limit.item, limit.name, *identifiers)

    def _client_identifiers(
        self, client_id: str | None, address: str
    ) -> list[tuple[Limit, tuple[str, ...]]]:
        # A counter per client only for clients that exist, so made-up ids cost no memory.
        keys = {"client_address": (address,)}
        if client_id is not None:
            keys |= {"client": (client_id,), "client_pair": (client_id, address)}
        return [(self._limits[name], keys[name]) for name in keys]

    def check_password(self, check: Callable[[], T]) -> T:
        """Run ``check`` on a hashing thread once a slot is free, or answer 503 if none frees up."""
        # OWASP Password Storage Cheat Sheet: memory-hard hashing must not exhaust memory.
        if not self._slots.acquire(timeout=SLOT_WAIT):
            message = "Too many logins are being checked right now. Try again in a second."
            raise APIError(503, "server_busy", message, {"Retry-After": "1"})
        try:
            return self._hashers.submit(check).result()
        finally:
            self._slots.release()

    def _identifiers(self, email: str, address: str) -> list[tuple[Limit, tuple[str, ...]]]:
        keys = {"address": (address,), "email_address": (email, address), "account": (email,)}
        return [(self._limits[name], keys[name]) for name in keys]

    def _throttled(self, limit: Limit, identifiers: tuple[str, ...]) -> Throttled:
        stats = self._limiter.get_window_stats(limit.item, limit.name, *identifiers)
        is_client = limit.name.startswith("client")
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        error = Throttled(
            429,
            "too_many_requests",
            f"Too many failed {'authentications' if is_client else 'logins'}; "
            f"retry in {retry_after} s.",
            # RFC 6585 §4: a 429 may say in Retry-After how long to wait.
            {"Retry-After": str(retry_after)},
        )
        error.limit = limit.name
        return error
