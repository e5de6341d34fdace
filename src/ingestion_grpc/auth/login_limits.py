"""Sign-in attempts counted per account and per client address, in Redis.

Every API server shares the counters, so the limits hold for the whole
deployment. Fixed windows: the first attempt of a window starts it
(`LOGIN_FAILURE_WINDOW`), and its counter disappears when it ends.

An attempt is counted before its password is checked (one atomic step, so
parallel attempts cannot slip past the limit together) and uncounted once it
succeeds: a successful sign-in clears its account's counter and takes its own
attempt back from the address's. Past either limit every attempt is refused,
the right password too (otherwise the limit would still confirm a guess),
without checking the password, so an attempt on an unknown account meets the
same counters, the same work and the same answer as one on a real account.
A refused attempt is taken back too: it was never checked, so it is no
failure (an address already blocked cannot go on to lock accounts).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from datetime import timedelta

import redis

from ingestion_grpc.errors import ResourceExhausted, Unavailable


@dataclass(frozen=True)
class LoginLimits:
    max_failures_per_account: int = 10
    max_failures_per_address: int = 100
    window: timedelta = timedelta(minutes=15)


class TooManyLogins(ResourceExhausted):
    """Raised for an attempt past a limit; `retry_after` is in whole seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            f"Too many failed sign-ins; try again in {retry_after} seconds.",
            retry_after=retry_after,
        )


class LoginThrottle:
    def __init__(self, client: redis.Redis, namespace: str, limits: LoginLimits) -> None:
        self._redis = client
        self._prefix = f"{namespace}:login-attempts"
        self._limits = limits
        # Only while the window lasts: a DECR of an expired key would make a
        # counter without an expiry.
        self._take_back = client.register_script(
            "if redis.call('exists', KEYS[1]) == 1 then redis.call('decr', KEYS[1]) end"
        )

    def attempt(self, email: str, address: str) -> None:
        """Count an attempt; TooManyLogins when it is past a limit."""
        keys = (self._account_key(email), self._address_key(address))
        limits = (self._limits.max_failures_per_account, self._limits.max_failures_per_address)
        window_ms = int(self._limits.window.total_seconds() * 1000)
        try:
            pipe = self._redis.pipeline(transaction=True)
            for key in keys:
                # Starts the window with the first attempt; later ones keep its end.
                pipe.set(key, 0, px=window_ms, nx=True)
                pipe.incr(key)
                pipe.pttl(key)
            replies = pipe.execute()
        except redis.RedisError:
            raise Unavailable("Sign-in is not available right now; try again later.") from None
        waits = [
            ttl_ms
            for (count, ttl_ms), limit in zip(
                ((replies[1], replies[2]), (replies[4], replies[5])), limits, strict=True
            )
            if count > limit
        ]
        if waits:
            # Refused unchecked, so not a failure: it counts against neither.
            self._uncount(keys)
            raise TooManyLogins(max(1, math.ceil(max(waits) / 1000)))

    def succeeded(self, email: str, address: str) -> None:
        """Clear the account's failures and take this attempt back from the address's."""
        # The user is signed in whatever Redis says: a counter left too high
        # only expires at the end of its window.
        with contextlib.suppress(redis.RedisError):
            self._redis.delete(self._account_key(email))
        self._uncount([self._address_key(address)])

    def _uncount(self, keys: list[str] | tuple[str, ...]) -> None:
        for key in keys:
            with contextlib.suppress(redis.RedisError):
                self._take_back(keys=[key])

    def _account_key(self, email: str) -> str:
        # Hashed: the key names no address, known or not.
        digest = hashlib.sha256(email.strip().lower().encode()).hexdigest()
        return f"{self._prefix}:account:{digest}"

    def _address_key(self, address: str) -> str:
        return f"{self._prefix}:address:{address}"
