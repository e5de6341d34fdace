"""Retrying a cloud API call: exponential backoff with jitter, honouring Retry-After
(and the small HTTP facts the cloud providers share).

Built on tenacity (the retry library most Python API clients use), so the policy
is one declaration: a provider raises `RetryLater` from its call wrapper for what
may succeed later (429, 5xx, a dropped connection), and `with_retries` waits
`max(Retry-After, random exponential)` before the next attempt. When the attempts
are used up the last `RetryLater` is raised again for the provider to translate.

Every attempt is counted here, for the metrics, by the provider the engine is
working for (`telemetry.context`): requests, those worth retrying, and those
refused as too many (a `RetryLater` with `throttled`).
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import TypeVar

import tenacity

from ingestion_grpc.telemetry import context, metrics

T = TypeVar("T")

log = logging.getLogger(__name__)

ATTEMPTS = 7
# Backoff grows 1 s, 2 s, 4 s ... up to MAX_WAIT_SECONDS, each drawn at random
# below its bound (full jitter), so workers throttled together do not retry together.
FIRST_WAIT_SECONDS = 1.0
MAX_WAIT_SECONDS = 60.0


class RetryLater(Exception):
    """Raised by a call wrapper when the request may succeed if tried again."""

    # Whether the service refused the request as one too many (HTTP 429, a
    # rate-limit 403): counted apart, since it says the limits are set too high.
    throttled: bool = False

    def __init__(
        self, reason: str, retry_after: float | None = None, *, throttled: bool | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        if throttled is not None:
            self.throttled = throttled


_jitter = tenacity.wait_random_exponential(multiplier=FIRST_WAIT_SECONDS, max=MAX_WAIT_SECONDS)


def _wait(state: tenacity.RetryCallState) -> float:
    error = state.outcome.exception() if state.outcome else None
    hinted = error.retry_after if isinstance(error, RetryLater) and error.retry_after else 0.0
    return max(min(hinted, MAX_WAIT_SECONDS * 5), _jitter(state))


def _log_retry(state: tenacity.RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.info(
        "attempt %d failed (%s); next in %.1f s",
        state.attempt_number,
        error.reason if isinstance(error, RetryLater) else type(error).__name__,
        state.upcoming_sleep,
    )


def with_retries(
    call: Callable[[], T],
    *,
    attempts: int = ATTEMPTS,
    sleep: Callable[[float], None] = tenacity.nap.sleep,
) -> T:
    """`call()`, tried up to `attempts` times while it raises RetryLater."""
    provider = context.provider() or "unknown"

    def counted() -> T:
        metrics.PROVIDER_REQUESTS.labels(provider).inc()
        try:
            return call()
        except RetryLater as error:
            metrics.PROVIDER_RETRIES.labels(provider).inc()
            if error.throttled:
                metrics.PROVIDER_THROTTLED.labels(provider).inc()
            raise

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(RetryLater),
        wait=_wait,
        stop=tenacity.stop_after_attempt(attempts),
        before_sleep=_log_retry,
        sleep=sleep,
        reraise=True,
    )
    return retrying(counted)


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta seconds or an HTTP date), if any."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def is_loopback_host(host: str) -> bool:
    """Whether `host` names this machine: plain http is allowed only there (tests)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
