"""Microsoft Graph calls for the `microsoft_365` provider: JSON pages and streamed
message bodies, each inside the mailbox's shared limits (a token of its request
bucket, one of its concurrency places), retried when Graph says "later".

429, 500, 502, 503 and 504 are retried with `retries.with_retries`, waiting at least
Retry-After; a 429 or 503 with Retry-After also pauses the mailbox's other requests in
this process for that long, so a throttled mailbox slows down as a whole while the
others go on. A 401 drops the cached token and asks for a new one, once per call.
Any other refusal is a GraphError for the caller to interpret (a 404 means a message
gone, a folder gone or a user without a mailbox, depending on the request).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import requests

from ingestion_grpc.errors import ProviderAuthError, ProviderUnavailable
from ingestion_grpc.providers.base import ConcurrencyLimit, JsonDict, Limiter, RateLimit
from ingestion_grpc.providers.graph_auth import TIMEOUTS, GraphApp, nap, tls_failed
from ingestion_grpc.providers.retries import RetryLater, retry_after_seconds, with_retries

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Graph's limits belong to each mailbox (per app): 10,000 requests per 10 minutes and
# 4 requests at once. A token bucket lets `burst` + `rate` x 600 requests through in
# any 10 minutes: 50 + 16 x 600 = 9,650 stays under 10,000 with room for clock skew.
MAILBOX_REQUESTS = RateLimit("graph_mailbox_requests", rate=16.0, burst=50.0)
# A place's lease is renewed every third of it while held; a worker killed holding
# places gives them back when their leases run out. Graph requests are short (a
# page, one message), so 10 s rather than the default 2 minutes: the mailbox's
# next reader (the watchdog's retry, another source of the same app) waits no longer.
MAILBOX_CONCURRENCY = ConcurrencyLimit("graph_mailbox_concurrency", limit=4, lease_seconds=10.0)

GRAPH_VERSION = "v1.0"
ATTEMPTS = 7
CHUNK_BYTES = 1024 * 1024
# An error body is read for its code and message; nothing legitimate is larger.
ERROR_BODY_BYTES = 64 * 1024
# Exchange Online accepts messages of at most 150 MB.
MAX_MESSAGE_BYTES = 200 * 1024 * 1024


class Throttled(RetryLater):
    """Graph answered 429: this mailbox is over its limits."""

    throttled = True


class GraphError(Exception):
    """A Graph answer that is neither a success nor worth retrying now."""

    def __init__(self, status: int, code: str, message: str, what: str) -> None:
        super().__init__(f"{what}: Microsoft Graph answered {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class MailboxGate:
    """One mailbox's shared limits, plus a pause its threads here keep after a 429."""

    def __init__(self, limiter: Limiter, key: str) -> None:
        self.limiter = limiter
        self.key = key
        self._lock = threading.Lock()
        self._paused_until = 0.0

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        with self._lock:
            delay = self._paused_until - time.monotonic()
        if delay > 0:
            nap(delay)
        self.limiter.acquire(MAILBOX_REQUESTS.name, self.key)
        with self.limiter.slot(MAILBOX_CONCURRENCY.name, self.key):
            yield


@dataclass(frozen=True)
class _Failure:
    status: int
    code: str
    message: str
    retry_after: float | None


class GraphClient:
    """Graph requests for one source: JSON pages and streamed message bodies."""

    def __init__(self, app: GraphApp) -> None:
        self.app = app
        self.root = f"{app.credentials.graph}/{GRAPH_VERSION}"

    def url(self, path: str) -> str:
        return self.root + path

    def absolute(self, link: str) -> str:
        """A link Graph returned (nextLink, deltaLink), on the configured endpoint.

        Graph writes its own host into links; behind a proxy or national-cloud
        gateway the token must still go to MICROSOFT_GRAPH_ENDPOINT only.
        """
        if link.startswith(self.root + "/"):
            return link
        marker = f"/{GRAPH_VERSION}/"
        at = link.find(marker)
        if at < 0:
            raise ProviderUnavailable(f"Microsoft Graph returned a link outside {GRAPH_VERSION}")
        return self.root + link[at + len(marker) - 1 :]

    def pages(
        self, url: str, *, what: str, gate: MailboxGate | None = None, prefer: str = ""
    ) -> Iterator[JsonDict]:
        """Every item of a collection, through its @odata.nextLink pages."""
        link: str | None = url
        while link:
            page = self.get_json(link, what=what, gate=gate, prefer=prefer)
            items = page.get("value")
            if not isinstance(items, list):
                raise ProviderUnavailable(f"{what}: Microsoft Graph answered without a value list")
            yield from (item for item in items if isinstance(item, dict))
            next_link = page.get("@odata.nextLink")
            link = self.absolute(next_link) if isinstance(next_link, str) else None

    def get_json(
        self,
        url: str,
        *,
        what: str,
        gate: MailboxGate | None = None,
        prefer: str = "",
        attempts: int = ATTEMPTS,
    ) -> JsonDict:
        return self._call(url, _read_json, what=what, gate=gate, prefer=prefer, attempts=attempts)

    def get_bytes(
        self, url: str, *, what: str, gate: MailboxGate, prefer: str, attempts: int
    ) -> bytes:
        return self._call(url, _read_body, what=what, gate=gate, prefer=prefer, attempts=attempts)

    def _call(
        self,
        url: str,
        read: Callable[[requests.Response], T],
        *,
        what: str,
        gate: MailboxGate | None,
        prefer: str,
        attempts: int,
    ) -> T:
        """`read(response)` of a 2xx answer; raises GraphError for a definite refusal,
        RetryLater (Throttled for 429) once `attempts` are used up, ProviderAuthError
        when Graph refuses a fresh token too."""

        def attempt() -> T:
            refreshed = False
            while True:
                token = self.app.token()
                headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
                if prefer:
                    headers["Prefer"] = prefer
                outcome = self._once(url, headers, read, what, gate)
                if not isinstance(outcome, _Failure):
                    return outcome
                if outcome.status == 401 and not refreshed:
                    logger.info("%s: Graph refused the access token; getting a new one", what)
                    self.app.drop(token)
                    refreshed = True
                    continue
                raise _classify(outcome, what, gate)

        return with_retries(attempt, attempts=attempts, sleep=nap)

    def _once(
        self,
        url: str,
        headers: Mapping[str, str],
        read: Callable[[requests.Response], T],
        what: str,
        gate: MailboxGate | None,
    ) -> T | _Failure:
        with gate.request() if gate is not None else contextlib.nullcontext():
            try:
                with self.app.http.get(
                    url, headers=dict(headers), timeout=TIMEOUTS, stream=True
                ) as response:
                    if 200 <= response.status_code < 300:
                        return read(response)
                    return _failure(response)
            except requests.exceptions.SSLError:
                raise tls_failed(self.app.credentials.graph) from None
            except requests.RequestException as exc:
                raise RetryLater(f"{what}: network error ({type(exc).__name__})") from None


def _classify(failure: _Failure, what: str, gate: MailboxGate | None) -> Exception:
    detail = f"{failure.status} {failure.code}".strip()
    if failure.status == 401:
        return ProviderAuthError(
            f"authentication failed: Microsoft Graph refused a new access token too "
            f"({detail}: {failure.message})"
        )
    if failure.status == 429:
        if gate is not None and failure.retry_after:
            gate.pause(failure.retry_after)
        return Throttled(f"{what}: throttled ({detail})", failure.retry_after)
    if failure.status in (500, 502, 503, 504):
        if gate is not None and failure.retry_after:
            gate.pause(failure.retry_after)
        return RetryLater(f"{what}: {detail}", failure.retry_after)
    return GraphError(failure.status, failure.code, failure.message, what)


def _failure(response: requests.Response) -> _Failure:
    code, message = "", response.reason or ""
    body = b""
    with contextlib.suppress(requests.RequestException):
        for chunk in response.iter_content(CHUNK_BYTES):
            body += chunk
            if len(body) >= ERROR_BODY_BYTES:
                break
    with contextlib.suppress(ValueError, AttributeError):
        error = json.loads(body).get("error")
        if isinstance(error, dict):
            code = str(error.get("code") or "")
            message = str(error.get("message") or message)
    return _Failure(
        response.status_code,
        code,
        message[:300],
        retry_after_seconds(response.headers.get("Retry-After")),
    )


def _read_json(response: requests.Response) -> JsonDict:
    try:
        data = json.loads(response.content)
    except ValueError:
        raise RetryLater("Microsoft Graph answered with a body that is not JSON") from None
    if not isinstance(data, dict):
        raise RetryLater("Microsoft Graph answered with JSON that is not an object")
    return data


def _read_body(response: requests.Response) -> bytes:
    # In chunks, so that a body larger than any Exchange message is refused before it
    # fills the worker's memory (a broken proxy, a wrong endpoint).
    parts: list[bytes] = []
    size = 0
    for chunk in response.iter_content(CHUNK_BYTES):
        size += len(chunk)
        if size > MAX_MESSAGE_BYTES:
            raise GraphError(
                response.status_code,
                "MessageTooLarge",
                f"the body exceeds {MAX_MESSAGE_BYTES // (1024 * 1024)} MiB",
                "downloading a message",
            )
        parts.append(chunk)
    return b"".join(parts)
