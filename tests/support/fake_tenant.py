"""A test-only tenant provider and the small HTTP server it reads, to prove the
engine's tenant features before any cloud provider: several mailboxes, messages
in several folders at once, unreadable mailboxes, messages gone or failing
between listing and fetching, downloads skipped for what the archive holds, and
limits shared by every worker process (measured here, at the server's side).

The server speaks plain JSON:

    GET /users                         [{"id", "name", "skip"}]
    GET /users/{id}/messages           [{"id", "folders"}] sorted by id
    GET /users/{id}/messages/{mid}     the raw message; 404 gone, 500 failing

Workers load the provider through PROVIDER_PLUGINS (tests/support/services.py).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import requests

from ingestion_grpc.errors import (
    ConnectionCheckFailed,
    InvalidArgument,
    MailboxUnavailable,
    ProviderUnavailable,
)
from ingestion_grpc.providers.base import (
    MAX_CONCURRENT_MAILBOXES_FIELD,
    Batch,
    ConcurrencyLimit,
    ConfigField,
    FetchContext,
    FetchedMessage,
    JsonDict,
    KnownMessage,
    Mailbox,
    Provider,
    RateLimit,
    Unfetched,
    check_mailbox_concurrency,
)
from ingestion_grpc.providers.concurrent import fetch_in_order

# --- the server ------------------------------------------------------------------------


@dataclass
class FakeUser:
    id: str
    name: str
    # Non-empty: GET /users says so, as a directory marks an unlicensed user.
    skip: str = ""
    # Non-empty: the user is listed as readable, but reading its mail answers 403.
    refuse: str = ""
    messages: dict[str, tuple[bytes, list[str]]] = field(default_factory=dict)


@dataclass
class ServerRecord:
    """What the server saw, for tests and benchmarks to assert on."""

    downloads: list[tuple[str, str, float]] = field(default_factory=list)  # user, mid, time
    listings: list[str] = field(default_factory=list)
    peak_in_flight: dict[str, int] = field(default_factory=dict)


class FakeTenantServer:
    """The tenant's mail, served on 127.0.0.1; change it between runs."""

    def __init__(self, latency: float = 0.0) -> None:
        self.users: dict[str, FakeUser] = {}
        self.gone: set[str] = set()  # message ids that answer 404
        self.failing: set[str] = set()  # message ids that answer 500
        self.latency = latency
        self.record = ServerRecord()
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    def start(self) -> FakeTenantServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()

    def add_user(self, user_id: str, name: str, *, skip: str = "", refuse: str = "") -> FakeUser:
        user = FakeUser(user_id, name, skip, refuse)
        self.users[user_id] = user
        return user

    def downloads_of(self, user_id: str) -> list[str]:
        return [mid for user, mid, _ in self.record.downloads if user == user_id]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                parts = self.path.strip("/").split("/")
                if parts == ["users"]:
                    self._json(
                        200,
                        [
                            {"id": u.id, "name": u.name, "skip": u.skip}
                            for u in server.users.values()
                        ],
                    )
                    return
                user = server.users.get(parts[1]) if len(parts) >= 3 else None
                if user is None or parts[2] != "messages":
                    self._json(404, {"error": "no such user"})
                    return
                if user.refuse:
                    self._json(403, {"error": user.refuse})
                    return
                if len(parts) == 3:
                    server.record.listings.append(user.id)
                    listing = [
                        {"id": mid, "folders": f} for mid, (_, f) in sorted(user.messages.items())
                    ]
                    self._json(200, listing)
                    return
                self._download(user, parts[3])

            def _download(self, user: FakeUser, message_id: str) -> None:
                with server._lock:
                    now_in = server._in_flight.get(user.id, 0) + 1
                    server._in_flight[user.id] = now_in
                    peak = server.record.peak_in_flight
                    peak[user.id] = max(peak.get(user.id, 0), now_in)
                try:
                    if server.latency:
                        time.sleep(server.latency)
                    with server._lock:
                        server.record.downloads.append((user.id, message_id, time.monotonic()))
                    if message_id in server.gone or message_id not in user.messages:
                        self._json(404, {"error": "gone"})
                    elif message_id in server.failing:
                        self._json(500, {"error": "failing"})
                    else:
                        self._bytes(user.messages[message_id][0])
                finally:
                    with server._lock:
                        server._in_flight[user.id] -= 1

            def _json(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _bytes(self, data: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "message/rfc822")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


# --- the provider ---------------------------------------------------------------------

USER_RATE = "fake_tenant_user"
USER_CONCURRENCY = "fake_tenant_user_concurrency"
# Shared by every mailbox of one tenant, so by every worker reading it (as a
# cloud API's per-project quota is).
TENANT_RATE = "fake_tenant_tenant"


class FakeTenant(Provider):
    """The provider for `FakeTenantServer`; `provider: fake_tenant`.

    Cursor: `{"after": <last message id handed over>, "failed": [ids to retry]}`.
    """

    name = "fake_tenant"
    fields = (
        ConfigField("endpoint", str),
        ConfigField("batchSize", int, required=False),
        MAX_CONCURRENT_MAILBOXES_FIELD,
    )
    limits: ClassVar = (
        RateLimit(USER_RATE, rate=1000.0, burst=10.0),
        RateLimit(TENANT_RATE, rate=1000.0, burst=2.0),
        ConcurrencyLimit(USER_CONCURRENCY, limit=2, lease_seconds=30.0),
    )
    max_concurrent_mailboxes = 4

    @classmethod
    def check_values(cls, config: JsonDict) -> None:
        if not str(config["endpoint"]).startswith("http://127.0.0.1:"):
            raise InvalidArgument("providerConfig.endpoint", "must be a local test server")
        check_mailbox_concurrency(config)

    def _get(self, path: str) -> requests.Response:
        try:
            return requests.get(self.config["endpoint"] + path, timeout=10)
        except requests.RequestException as exc:
            raise ProviderUnavailable(
                f"the fake tenant is unreachable: {type(exc).__name__}"
            ) from None

    def check_connection(self) -> None:
        try:
            self._get("/users").raise_for_status()
        except (ProviderUnavailable, requests.HTTPError) as exc:
            raise ConnectionCheckFailed(str(exc)) from None

    def list_mailboxes(self) -> list[Mailbox]:
        users = self._get("/users").json()
        return [Mailbox(u["id"], u["name"], u["skip"]) for u in users]

    def fetch(
        self, mailbox: Mailbox, cursor: JsonDict | None, context: FetchContext
    ) -> Iterator[Batch]:
        listing = self._get(f"/users/{mailbox.id}/messages")
        if listing.status_code == 403:
            raise MailboxUnavailable(f"the tenant refuses to open it: {listing.json()['error']}")
        folders = {m["id"]: tuple(m["folders"]) for m in listing.json()}
        after = str((cursor or {}).get("after", ""))
        retry = [mid for mid in (cursor or {}).get("failed", []) if mid in folders]
        todo = retry + [mid for mid in sorted(folders) if mid > after and mid not in retry]
        archived = context.archive.archived_ids(todo)
        size = int(self.config.get("batchSize") or 10)
        still_failing: list[str] = []
        processed: set[str] = set()
        for start in range(0, len(todo), size):
            ids = todo[start : start + size]
            known = [KnownMessage(mid, folders[mid]) for mid in ids if mid in archived]
            wanted = [mid for mid in ids if mid not in archived]
            fetched: list[FetchedMessage] = []
            skipped: list[Unfetched] = []
            failed: list[Unfetched] = []
            for mid, response in fetch_in_order(
                lambda mid: self._download(mailbox, mid, context),
                wanted,
                max_in_flight=4,
                size_of=lambda r: len(r.content),
                max_bytes_waiting=8 << 20,
            ):
                if response.status_code == 200:
                    fetched.append(FetchedMessage(response.content, folders[mid], mid))
                elif response.status_code == 404:
                    skipped.append(Unfetched(mid, "gone"))
                else:
                    failed.append(Unfetched(mid, f"HTTP {response.status_code}"))
                    still_failing.append(mid)
            processed.update(ids)
            done = [mid for mid in ids if mid not in retry]
            if done:
                after = max(after, *done)
            yield Batch(
                fetched,
                {
                    "after": after,
                    "failed": still_failing + [m for m in retry if m not in processed],
                },
                known=known,
                skipped=skipped,
                failed=failed,
            )

    def _download(
        self, mailbox: Mailbox, message_id: str, context: FetchContext
    ) -> requests.Response:
        context.limits.acquire(TENANT_RATE, self.config["endpoint"])
        context.limits.acquire(USER_RATE, mailbox.id)
        with context.limits.slot(USER_CONCURRENCY, mailbox.id):
            return self._get(f"/users/{mailbox.id}/messages/{message_id}")


@cache
def shared_tenant() -> FakeTenantServer:
    """One empty tenant for the whole test run: sources that must be created (and
    whose connection check must pass) without being about any cloud provider."""
    return FakeTenantServer().start()


def tenant_config() -> dict[str, str]:
    return {"endpoint": shared_tenant().url}
