"""The providers' declared limits, kept in Redis so that every worker process on
every machine shares them (the `Limiter` of `providers.base`).

* Each check-and-update is one Lua script, which Redis runs atomically: one round
  trip a call and no WATCH/MULTI retry loops.
* The scripts read Redis's clock (`TIME`), never the caller's: workers on
  machines whose clocks disagree would otherwise disagree about how far a bucket
  has refilled or whether a lease has expired.
* A rate limit is a token bucket with reservations: a caller takes its units at
  once, the bucket may go negative, and the caller is told how long to sleep
  until its units are due. Waiters never poll, are served in arrival order, and
  any stretch of T seconds grants at most `burst + rate * T` units.
* A concurrency limit is a set of leases, not a counter: a sorted set of lease
  ids scored by expiry time. A worker killed inside frees its place when its
  lease expires; a live holder's lease is renewed by a background thread.

Why not Dramatiq's rate limiters (`dramatiq.rate_limits`): its
ConcurrentRateLimiter is one counter per key whose TTL every successful acquire
and every release set again, so a place leaked by a killed worker comes back only
once the whole counter goes `ttl` (15 minutes by default) untouched, which never
happens while the other places are in use; and when the counter does expire it
forgets the live holders too, letting in more than `limit`. Its Bucket and Window
limiters count calls (no cost) in fixed windows, or in a window of one-second
counters, timed by the caller's clock; and none of them waits: the caller gets
RateLimitExceeded (or False) and must retry.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import redis

from ingestion_grpc.providers.base import ConcurrencyLimit, Limit, RateLimit

log = logging.getLogger(__name__)

# Numbers go in and out of the scripts as strings: a Lua number in a reply is
# truncated to an integer, and Lua's own tostring keeps 14 digits, too few for
# microseconds of a Unix time.
_BUCKET_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = burst
else
  -- Redis's clock can step back (a failover to another machine): never refill
  -- the same moment twice.
  now = math.max(now, at)
  tokens = math.min(burst, tokens + (now - at) * rate)
end
-- The debt is not bounded: it is the units of the callers already sleeping
-- until theirs are due, each holding one reservation, so it is bounded by how
-- many are waiting. A bound would turn the callers beyond it back into pollers
-- and give up serving them in order; a waiter killed in its sleep only leaves
-- its units unused, which errs on the safe side. A negative cost gives units
-- back, never beyond the burst.
tokens = math.min(burst, tokens - cost)
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
  'at', string.format('%.17g', now))
-- Once full again the bucket is the same as no bucket: let it vanish then.
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
if tokens >= 0 then
  return '0'
end
return string.format('%.17g', -tokens / rate)
"""

_TAKE_SCRIPT = """
local limit = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], string.format('%.17g', now + lease), ARGV[3])
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  redis.call('PEXPIRE', KEYS[1], math.ceil((tonumber(last[2]) - now) * 1000) + 1000)
  return '0'
end
-- Full: the longest the caller must wait if nobody releases.
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return string.format('%.17g', tonumber(first[2]) - now)
"""

_RENEW_SCRIPT = """
local lease = tonumber(ARGV[1])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
-- A lease that has expired stays lost: its place may have been given away.
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', string.format('%.17g', now + lease), ARGV[2])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[1], math.ceil((tonumber(last[2]) - now) * 1000) + 1000)
return 1
"""

# A waiting slot() asks again this often: a freed place is taken within tens of
# milliseconds, and the jitter keeps waiters from asking in step.
_POLL_SECONDS = (0.01, 0.05)
# Dramatiq's time limits and shutdown raise an exception in the worker thread
# asynchronously, and CPython delivers it only between bytecodes: a thread in one
# long time.sleep would not see it until the sleep ends.
_SLEEP_SLICE_SECONDS = 0.5
# Renewing after a third of the lease lets two renewals in a row fail (a Redis
# blip) before the lease expires.
_RENEW_FRACTION = 1 / 3
# A failed renewal is tried again this soon (or sooner, for short leases).
_RENEW_RETRY_SECONDS = 1.0
# The renewal thread ends after this long with no lease held, and starts again
# with the next one: idle limiters keep no thread.
_RENEWER_IDLE_SECONDS = 30.0


class RedisLimiter:
    """The declared limits, shared through the Redis at `client`.

    Keys are `{namespace}:limit:{name}:{key}`. A bucket is a hash that expires
    once it would be full again; a concurrency limit is a sorted set that expires
    with its last lease.
    """

    def __init__(self, client: redis.Redis, namespace: str, limits: Iterable[Limit]) -> None:
        self._client = client
        self._namespace = namespace
        self._limits: dict[str, Limit] = {}
        for limit in limits:
            _check(limit)
            declared = self._limits.setdefault(limit.name, limit)
            if declared != limit:
                raise ValueError(
                    f"limit {limit.name!r} is declared twice, differently: {declared} and {limit}"
                )
        self._bucket = client.register_script(_BUCKET_SCRIPT)
        self._take = client.register_script(_TAKE_SCRIPT)
        self._renew = client.register_script(_RENEW_SCRIPT)
        self._renewer = _Renewer(self._renew_lease)

    def acquire(self, name: str, key: str, cost: float = 1.0) -> None:
        """Block until `cost` units of bucket `name` for `key` may be spent.

        A cost above the burst is allowed: it waits until the bucket has refilled
        enough to pay it off.
        """
        limit = self._rate_limit(name)
        if not 0 <= cost < math.inf:
            raise ValueError(f"the cost of {name!r} must be a finite number >= 0, not {cost}")
        if cost == 0:
            return
        bucket = self._key(name, key)
        wait = float(self._bucket(keys=[bucket], args=[limit.rate, limit.burst, cost]))
        if wait <= 0:
            return
        try:
            _sleep(wait)
        except BaseException:
            # Interrupted before its units were due (a time limit, a shutdown):
            # give them back so that the next callers can use them. A failure to
            # give them back must not hide the interruption.
            with contextlib.suppress(redis.RedisError):
                self._bucket(keys=[bucket], args=[limit.rate, limit.burst, -cost])
            raise

    @contextlib.contextmanager
    def slot(self, name: str, key: str) -> Iterator[None]:
        """Hold one of the concurrency limit `name`'s places for `key` while inside.

        Waits as long as it takes for a place; the place is released on leaving,
        on an exception too, and its lease is renewed for as long as it is held.
        """
        limit = self._concurrency_limit(name)
        leases = self._key(name, key)
        lease_id = uuid.uuid4().hex
        while True:
            wait = float(
                self._take(keys=[leases], args=[limit.limit, limit.lease_seconds, lease_id])
            )
            if wait <= 0:
                break
            time.sleep(min(wait, random.uniform(*_POLL_SECONDS)))
        try:
            self._renewer.hold(leases, lease_id, limit.lease_seconds)
            yield
        finally:
            self._renewer.drop(lease_id)
            try:
                self._client.zrem(leases, lease_id)
            except redis.RedisError:
                # The lease frees the place when it expires anyway, and raising
                # here would hide the holder's own exception, if any.
                log.warning(
                    "could not release a place of %s; it frees when its lease expires",
                    leases,
                    exc_info=True,
                )

    def _key(self, name: str, key: str) -> str:
        return f"{self._namespace}:limit:{name}:{key}"

    def _rate_limit(self, name: str) -> RateLimit:
        limit = self._limits.get(name)
        if isinstance(limit, RateLimit):
            return limit
        if isinstance(limit, ConcurrencyLimit):
            raise KeyError(f"{name!r} is a concurrency limit: hold it with slot(), not acquire()")
        raise KeyError(self._unknown(name))

    def _concurrency_limit(self, name: str) -> ConcurrencyLimit:
        limit = self._limits.get(name)
        if isinstance(limit, ConcurrencyLimit):
            return limit
        if isinstance(limit, RateLimit):
            raise KeyError(f"{name!r} is a rate limit: spend it with acquire(), not slot()")
        raise KeyError(self._unknown(name))

    def _unknown(self, name: str) -> str:
        declared = ", ".join(sorted(self._limits)) or "none"
        return f"no limit named {name!r} was declared (declared: {declared})"

    def _renew_lease(self, leases: str, lease_id: str, seconds: float) -> bool:
        return bool(self._renew(keys=[leases], args=[seconds, lease_id]))


def redis_limiter(redis_url: str, namespace: str, limits: Iterable[Limit]) -> RedisLimiter:
    """A RedisLimiter on a connection pool of its own to the Redis at `redis_url`."""
    return RedisLimiter(redis.Redis.from_url(redis_url), namespace, limits)


def _check(limit: Limit) -> None:
    if isinstance(limit, RateLimit):
        if not (0 < limit.rate < math.inf and 0 < limit.burst < math.inf):
            raise ValueError(f"{limit}: rate and burst must be finite numbers > 0")
    elif limit.limit < 1 or not 0 < limit.lease_seconds < math.inf:
        raise ValueError(f"{limit}: limit must be >= 1 and lease_seconds a finite number > 0")


def _sleep(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, _SLEEP_SLICE_SECONDS))


@dataclass
class _Held:
    leases: str
    seconds: float
    renew_at: float


class _Renewer:
    """Renews the leases this process holds, from one thread per limiter.

    One thread rather than one per slot: slots are taken per request and most
    are released long before a renewal is due, so holding one costs a dict entry,
    not a thread start.
    """

    def __init__(self, renew: Callable[[str, str, float], bool]) -> None:
        self._renew = renew
        self._reset()
        _renewers.add(self)

    def _reset(self) -> None:
        self._changed = threading.Condition()
        self._held: dict[str, _Held] = {}
        self._running = False

    def hold(self, leases: str, lease_id: str, seconds: float) -> None:
        with self._changed:
            self._held[lease_id] = _Held(
                leases, seconds, time.monotonic() + seconds * _RENEW_FRACTION
            )
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="limits-renewer", daemon=True).start()
            self._changed.notify()

    def drop(self, lease_id: str) -> None:
        with self._changed:
            self._held.pop(lease_id, None)

    def _run(self) -> None:
        while True:
            with self._changed:
                due = self._wait_for_due()
                if due is None:
                    self._running = False
                    return
            for lease_id, held in due:
                self._renew_one(lease_id, held)

    def _wait_for_due(self) -> list[tuple[str, _Held]] | None:
        """The held leases due for renewal, or None once idle long enough to stop."""
        while True:
            now = time.monotonic()
            due = [(i, h) for i, h in self._held.items() if h.renew_at <= now]
            if due:
                return due
            if self._held:
                self._changed.wait(min(h.renew_at for h in self._held.values()) - now)
            elif not self._changed.wait(_RENEWER_IDLE_SECONDS) and not self._held:
                return None

    def _renew_one(self, lease_id: str, held: _Held) -> None:
        try:
            kept = self._renew(held.leases, lease_id, held.seconds)
        except Exception:
            # Whatever went wrong, this thread must go on renewing the others.
            log.warning("could not renew a lease of %s; trying again", held.leases, exc_info=True)
            kept = True
            next_try = min(_RENEW_RETRY_SECONDS, held.seconds * _RENEW_FRACTION)
        else:
            next_try = held.seconds * _RENEW_FRACTION
        with self._changed:
            if self._held.get(lease_id) is not held:
                return  # released meanwhile
            if not kept:
                # Only a process paused for longer than the lease (or Redis
                # unreachable for that long) gets here; the holder cannot be
                # stopped, so say so loudly: the limit may be exceeded.
                log.error(
                    "a place of %s was held past its lease and lost; the limit "
                    "may be exceeded until this holder leaves",
                    held.leases,
                )
                del self._held[lease_id]
                return
            held.renew_at = time.monotonic() + next_try


# A forked child inherits the renewers' state (and maybe a lock held by a thread
# that does not exist in it) but not their threads, and must not renew the
# parent's leases: start it afresh.
_renewers: weakref.WeakSet[_Renewer] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for renewer in list(_renewers):
        renewer._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
