"""Calling Google's Directory and Gmail APIs: one subject's authorized client,
usable from several threads at once, with the shared limits, retries and error
translation every call needs.

Transport: google-api-python-client speaks httplib2, and an `httplib2.Http` is
not thread-safe. The service (the request builder) is built once per subject and
shared; every thread executes its requests over its own `AuthorizedHttp`, all of
them on the subject's one credentials object. Concurrent refreshes of that token
are harmless (each fetches a valid token); the fetch makes its first call alone,
so a mailbox normally asks for one token an hour.

Errors leave this module as `RetryLater` (after the retries are used up: 429, a
403 rate limit, 5xx, a network error), `ApiRefused` (Google answered with an
error a retry will not cure; the caller decides what it means where it happens)
or `TokenRefused` (the token endpoint refused the subject). None of them carries
a credential: Google's error texts hold neither the key nor a token.

Logging: with this transport, google-auth logs request lines without headers,
googleapiclient logs URLs (ids, page tokens, never a token; its request/response
dumps are off unless `googleapiclient.model.dump_request_response` is set, which
this service never does), and httplib2 prints nothing unless its `debuglevel` is
raised. The provider's tests capture every one of these loggers at DEBUG and
search them for the key and the tokens.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import httplib2  # type: ignore[import-untyped]
from google.auth.exceptions import RefreshError, TransportError
from google_auth_httplib2 import AuthorizedHttp  # type: ignore[import-untyped]
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError
from googleapiclient.http import build_http

from ingestion_grpc.providers.base import (
    ConcurrencyLimit,
    JsonDict,
    Limiter,
    RateLimit,
)
from ingestion_grpc.providers.retries import RetryLater, retry_after_seconds, with_retries

logger = logging.getLogger(__name__)

DIRECTORY_SCOPE = "https://www.googleapis.com/auth/admin.directory.user.readonly"
GMAIL_SCOPE = "https://www.googleapis.com/auth/gmail.readonly"

# Gmail's published quotas: 250 units/s per user (a moving average: a burst below
# a second's worth leaves the server's average room for arrival jitter), 1,200,000
# units a minute per project, and about 5 requests in flight per user before
# "Too many concurrent requests for user".
USER_QUOTA = RateLimit("gmail_user", rate=250.0, burst=100.0)
PROJECT_QUOTA = RateLimit("gmail_project", rate=20_000.0, burst=20_000.0)
# A place is held for one request (tens of ms; a large message a few seconds, and
# the holder renews its lease every third of it), so a short lease costs almost no
# renewals, while the places of a worker killed mid-request come back within it:
# with minutes, the worker resuming that user could wait minutes for a request.
USER_IN_FLIGHT = ConcurrencyLimit("gmail_user_in_flight", limit=5, lease_seconds=10.0)
# Quota units are taken from the shared buckets a few calls' worth at a time: each
# take is a Redis round trip, which cost the worker more CPU than the request it
# paid for when it was made per call. What a fetch leaves unspent is never used
# (at most a chunk: 0.1 s of a user's quota), which errs on the safe side.
USER_CHUNK = 25.0  # 5 messages.get
PROJECT_CHUNK = 250.0

# Quota units per call (Gmail API "Usage limits").
COST_GET = 5.0
COST_LIST = 5.0
COST_HISTORY = 2.0
COST_PROFILE = 1.0
COST_LABELS = 1.0

# A 403 with one of these reasons is throttling, never a refusal.
RATE_LIMIT_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
# Google's error texts are short; a proxy's HTML page is not quoted whole.
MAX_QUOTED = 300

Sleep = Callable[[float], None]


class ApiRefused(Exception):
    """Google answered an API call with an error that retrying will not cure."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"HTTP {status} {reason or 'error'}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class TokenRefused(Exception):
    """The token endpoint refused to issue a token (`error` as OAuth 2.0 names it)."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}" if description else error)
        self.error = error
        self.description = description


@dataclass(frozen=True)
class Quota:
    """Where one subject's Gmail calls are counted: the engine's shared limits."""

    limits: Limiter
    user_key: str
    project_key: str


class Purse:
    """Units of one shared bucket, taken `chunk` at a time and spent call by call.

    Thread-safe: a caller that finds the purse short takes the next chunk (waiting
    until the bucket grants it) while the others wait for the purse, so chunks are
    taken one at a time, in order, and never more than needed.
    """

    def __init__(self, limits: Limiter, name: str, key: str, chunk: float) -> None:
        self._limits = limits
        self._name = name
        self._key = key
        self._chunk = chunk
        self._units = 0.0
        self._lock = threading.Lock()

    def spend(self, cost: float) -> None:
        if cost <= 0:
            return
        with self._lock:
            if self._units < cost:
                take = max(self._chunk, cost - self._units)
                self._limits.acquire(self._name, self._key, take)
                self._units += take
            self._units -= cost


class Client:
    """One Google API as one subject, safe to call from several threads."""

    def __init__(
        self,
        credentials: Any,
        api: str,
        version: str,
        *,
        endpoint: str,
        sleep: Sleep,
        attempts: int,
        quota: Quota | None = None,
        in_flight: int | None = None,
    ) -> None:
        self._credentials = credentials
        self._sleep = sleep
        self._attempts = attempts
        self._quota = quota
        self._purses = (
            (
                Purse(quota.limits, USER_QUOTA.name, quota.user_key, USER_CHUNK),
                Purse(quota.limits, PROJECT_QUOTA.name, quota.project_key, PROJECT_CHUNK),
            )
            if quota is not None
            else ()
        )
        self._local = threading.local()
        # At most this many of this client's requests at once, whatever the number of
        # threads calling it (the fetch runs more threads than that, so that a slow
        # request at the head of the hand-over order does not leave the others idle).
        self._requests: AbstractContextManager[Any] = (
            threading.BoundedSemaphore(in_flight) if in_flight else nullcontext()
        )
        options = {"api_endpoint": endpoint} if endpoint else None
        self.service = build(
            api,
            version,
            http=self._http(),
            static_discovery=True,
            cache_discovery=False,
            client_options=options,
        )

    def call(self, make: Callable[[Any], Any], *, cost: float = 0.0) -> JsonDict:
        """Execute the request `make(service)` returns, within the quota, with retries."""

        def attempt() -> JsonDict:
            # In turn with this client's other requests, then within the quota, then
            # in one of the user's places shared by every worker. The place is taken
            # after the quota wait, so it is held only while Google holds the request:
            # a worker killed mid-run leaves only its requests in flight to expire, not
            # every thread that was waiting for quota (the worker resuming the user
            # would wait a lease for them). One worker reads a user at a time, with
            # at most as many requests as places, so the quota is never spent on a
            # request that then waits long for its place.
            with self._requests:
                for purse in self._purses:
                    purse.spend(cost)
                with self._in_flight():
                    return execute(make(self.service), self._http())

        return with_retries(attempt, attempts=self._attempts, sleep=self._sleep)

    def _in_flight(self) -> AbstractContextManager[None]:
        if self._quota is None:
            return nullcontext()
        return self._quota.limits.slot(USER_IN_FLIGHT.name, self._quota.user_key)

    def _http(self) -> Any:
        http = getattr(self._local, "http", None)
        if http is None:
            http = AuthorizedHttp(self._credentials, http=build_http())
            self._local.http = http
        return http


def execute(request: Any, transport: Any) -> JsonDict:
    """One attempt of a googleapiclient request over `transport`, its failure translated."""
    try:
        result: JsonDict = request.execute(http=transport, num_retries=0)
    except HttpError as exc:
        raise _http_error(exc) from None
    except RefreshError as exc:
        raise _token_error(exc) from None
    except (TransportError, httplib2.HttpLib2Error, http.client.HTTPException, OSError) as exc:
        raise RetryLater(f"network error: {_short(exc)}") from None
    return result


def _http_error(exc: HttpError) -> Exception:
    status = int(exc.resp.status)
    reason, message = error_details(exc.content)
    message = message or str(exc.resp.reason or "")
    if status in RETRYABLE_STATUSES or (status == 403 and reason in RATE_LIMIT_REASONS):
        return RetryLater(
            f"HTTP {status} {reason or ''} {message}".strip()[:MAX_QUOTED],
            retry_after=retry_after_seconds(exc.resp.get("retry-after")),
            throttled=status == 429 or reason in RATE_LIMIT_REASONS,
        )
    return ApiRefused(status, reason, message[:MAX_QUOTED])


def error_details(content: bytes) -> tuple[str, str]:
    """(reason, message) of a Google JSON error body; ("", "") when it is not one."""
    try:
        error = json.loads(content.decode("utf-8"))["error"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "", ""
    if not isinstance(error, dict):
        return "", str(error)[:MAX_QUOTED]
    errors = error.get("errors")
    reason = ""
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        reason = str(errors[0].get("reason") or "")
    if not reason:
        reason = str(error.get("status") or "")
    return reason, str(error.get("message") or "")


def _token_error(exc: RefreshError) -> Exception:
    if getattr(exc, "retryable", False):
        return RetryLater(f"token endpoint: {_short(exc)}")
    data = exc.args[1] if len(exc.args) > 1 else None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        description = data.get("error_description")
        return TokenRefused(data["error"], str(description or "")[:MAX_QUOTED])
    return TokenRefused("refused", str(exc.args[0] if exc.args else "")[:MAX_QUOTED])


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_QUOTED]
