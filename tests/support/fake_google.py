"""A local fake of Google's wire protocol: the OAuth 2.0 token endpoint (jwt-bearer
grants, as domain-wide delegation uses them), the Admin SDK Directory `users.list`
and the Gmail API calls an archive makes, on 127.0.0.1, driven by the real
google-api-python-client and google-auth.

What it checks like Google does: the RS256 assertion against the registered key's
public half, its `iss`, `aud`, `exp`, `sub` and `scope`; the scopes granted to the
client (domain-wide delegation asks for all requested scopes or refuses the whole
request with `unauthorized_client`); the bearer token's scope and subject on every
API call; the per-user quota (a token bucket, 250 units/s by default, with Gmail's
costs) answering 429 when it is exceeded, and optionally a cap on requests in
flight per user.

Faults on demand: the next N calls answering 429 / 403 rateLimitExceeded / 5xx,
suspended users (the Directory says so and their token is refused), users without
Gmail, messages that 404 on get or keep failing, expired history ids, revoked
delegation (every token refused, issued ones invalid).

Use:

    with FakeGoogle() as google:
        key = google.new_key()
        google.add_user("admin@example.com", admin=True)
        google.add_user("alice@example.com")
        label = google.add_label("alice@example.com", "Projects/2024")
        google.add_message("alice@example.com", raw, ["INBOX", label])
        ... provider with GOOGLE_API_ENDPOINT = google.url and key.json ...
        google.count(api="messages.get"), google.requests, google.throttled, google.log
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DIRECTORY_SCOPE = "https://www.googleapis.com/auth/admin.directory.user.readonly"
GMAIL_SCOPE = "https://www.googleapis.com/auth/gmail.readonly"
BOTH_SCOPES = frozenset({DIRECTORY_SCOPE, GMAIL_SCOPE})

# Gmail's quota units per call.
COSTS = {
    "messages.get": 5.0,
    "messages.list": 5.0,
    "history.list": 2.0,
    "users.getProfile": 1.0,
    "labels.list": 1.0,
}
SYSTEM_LABELS = (
    "INBOX",
    "SENT",
    "DRAFT",
    "SPAM",
    "TRASH",
    "UNREAD",
    "STARRED",
    "IMPORTANT",
    "CHAT",
    "CATEGORY_PERSONAL",
    "CATEGORY_SOCIAL",
    "CATEGORY_PROMOTIONS",
    "CATEGORY_UPDATES",
    "CATEGORY_FORUMS",
)
# History ids grow by more than one per change, as Gmail's do.
HISTORY_STEP = 7
UNAUTHORIZED_CLIENT = (
    "Client is unauthorized to retrieve access tokens using this method, or client not "
    "authorized for any of the scopes requested."
)
GMAIL_APIS: dict[tuple[str, ...], str] = {
    ("profile",): "users.getProfile",
    ("labels",): "labels.list",
    ("messages",): "messages.list",
    ("history",): "history.list",
}
FAULT_TEXTS = {
    429: (
        "rateLimitExceeded",
        "RESOURCE_EXHAUSTED",
        "Resource has been exhausted (e.g. check quota).",
    ),
    403: ("rateLimitExceeded", "PERMISSION_DENIED", "User-rate limit exceeded."),
    500: ("backendError", "INTERNAL", "Internal error encountered."),
    502: ("backendError", "UNAVAILABLE", "Bad Gateway"),
    503: ("backendError", "UNAVAILABLE", "The service is currently unavailable."),
}


# --- service account keys -------------------------------------------------------------


@dataclass(frozen=True)
class ServiceAccountKey:
    """A throwaway service-account key file and what the fake needs to check it."""

    json: str
    private_key_pem: str
    client_email: str
    client_id: str
    private_key_id: str
    public_key_pem: bytes

    def with_other_private_key(self) -> str:
        """The same key file signed by another RSA key: Google sees a bad signature."""
        info = json.loads(self.json)
        info["private_key"] = _private_pem(_new_rsa())
        return json.dumps(info)


def make_service_account_key(
    token_uri: str,
    *,
    client_email: str = "archiver@fake-project.iam.gserviceaccount.com",
    project_id: str = "fake-project",
) -> ServiceAccountKey:
    """A new RSA key in the Cloud console's key-file format, tokens from `token_uri`."""
    private = _new_rsa()
    pem = _private_pem(private)
    key_id = secrets.token_hex(20)
    client_id = str(100000000000000000000 + secrets.randbelow(10**20))
    info = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": key_id,
        "private_key": pem,
        "client_email": client_email,
        "client_id": client_id,
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "universe_domain": "googleapis.com",
    }
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return ServiceAccountKey(json.dumps(info), pem, client_email, client_id, key_id, public)


def _new_rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _private_pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


# --- the domain -------------------------------------------------------------------------


@dataclass
class FakeMessage:
    id: str
    thread_id: str
    raw: bytes
    label_ids: list[str]
    seq: int
    history_id: int
    internal_date: int
    deleted: bool = False
    # Still listed, but `get` answers 404: gone between list and get.
    gone_on_get: bool = False
    # `get` answers this status every time (0: it does not fail).
    failing_status: int = 0


@dataclass
class HistoryRecord:
    id: int
    kind: str  # messageAdded, labelAdded, labelRemoved, messageDeleted
    message_id: str
    thread_id: str
    labels_now: list[str]
    changed: list[str]


@dataclass
class FakeUser:
    id: str
    email: str
    suspended: bool = False
    gmail: bool = True
    admin: bool = False
    messages: dict[str, FakeMessage] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # user label id -> name
    history: list[HistoryRecord] = field(default_factory=list)
    history_id: int = 0
    history_floor: int = 0
    tokens: float = 0.0
    refilled_at: float = 0.0
    in_flight: int = 0
    peak_in_flight: int = 0
    units: float = 0.0


@dataclass
class Fault:
    status: int
    remaining: int
    skip: int
    reason: str
    api: str | None
    email: str | None
    retry_after: str | None


@dataclass(frozen=True)
class Logged:
    """One request the fake answered."""

    at: float
    method: str
    api: str  # "token", "users.list", "messages.get", ...
    email: str  # the subject the call acted as ("" when unknown)
    path: str
    query: dict[str, list[str]]
    status: int
    # Refused by the quota or the in-flight cap (not an injected fault).
    throttled: bool = False


@dataclass
class _Token:
    client_email: str
    subject: str
    scopes: frozenset[str]
    expires_at: float


class _Reply(Exception):
    def __init__(
        self, status: int, body: Any, headers: dict[str, str] | None = None, throttled: bool = False
    ) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.throttled = throttled


class FakeGoogle:
    """The fake, serving on 127.0.0.1 (an ephemeral port) while started."""

    def __init__(
        self,
        *,
        quota: bool = False,
        rate: float = 250.0,
        burst: float = 250.0,
        page_size: int = 10,
        users_page_size: int = 3,
        history_page_size: int = 5,
        max_in_flight_per_user: int | None = None,
        latency: float = 0.0,
        keep_log: bool = True,
    ) -> None:
        self.quota = quota
        self.rate = rate
        self.burst = burst
        self.page_size = page_size
        self.users_page_size = users_page_size
        self.history_page_size = history_page_size
        self.max_in_flight_per_user = max_in_flight_per_user
        # Seconds every API call takes: makes calls overlap, as over a network.
        self.latency = latency
        # A benchmark of 100,000s of calls keeps the counters only.
        self.keep_log = keep_log
        self.requests = 0
        self.throttled = 0
        # Answers by (api, status), kept even without the log (a benchmark's counters).
        self.answered: Counter[tuple[str, int]] = Counter()
        self.delegation_revoked = False
        # Service accounts whose delegation alone is revoked (revoke_delegation(key)).
        self._revoked: set[str] = set()
        self._lock = threading.RLock()
        self._users: dict[str, FakeUser] = {}
        self._keys: dict[str, ServiceAccountKey] = {}
        self._grants: dict[str, set[str]] = {}
        self._tokens: dict[str, _Token] = {}
        self._faults: list[Fault] = []
        self._log: list[Logged] = []
        self._next = 0
        self._page_token_epoch = 1
        self.issued_tokens: list[str] = []
        self.assertions: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.fake = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def start(self) -> FakeGoogle:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeGoogle:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- keys and delegation ------------------------------------------------------------

    def new_key(self, **kwargs: Any) -> ServiceAccountKey:
        """A new key file whose token_uri is this fake, granted both scopes."""
        key = make_service_account_key(self.token_uri, **kwargs)
        self.register_key(key)
        return key

    def register_key(self, key: ServiceAccountKey, scopes: Iterable[str] = BOTH_SCOPES) -> None:
        with self._lock:
            self._keys[key.private_key_id] = key
            self._grants[key.client_email] = set(scopes)

    def grant(self, key: ServiceAccountKey, scopes: Iterable[str]) -> None:
        """Domain-wide delegation for exactly these scopes (the Admin console's list)."""
        with self._lock:
            self._grants[key.client_email] = set(scopes)

    def revoke_delegation(self, key: ServiceAccountKey | None = None) -> None:
        """Every token request refused; tokens already issued stop working too.

        With `key`, only that service account's (a session-wide fake serves many
        tests: one test's revocation must not reach another's sources).
        """
        with self._lock:
            if key is None:
                self.delegation_revoked = True
                self._tokens.clear()
                return
            self._revoked.add(key.client_email)
            for token, issued in list(self._tokens.items()):
                if issued.client_email == key.client_email:
                    del self._tokens[token]

    def restore_delegation(self, key: ServiceAccountKey | None = None) -> None:
        with self._lock:
            if key is None:
                self.delegation_revoked = False
            else:
                self._revoked.discard(key.client_email)

    # --- users, labels, messages ----------------------------------------------------

    def add_user(
        self, email: str, *, admin: bool = False, suspended: bool = False, gmail: bool = True
    ) -> FakeUser:
        with self._lock:
            self._next += 1
            user = FakeUser(
                id=str(110000000000000000000 + self._next * 7919),
                email=email,
                admin=admin,
                suspended=suspended,
                gmail=gmail,
                history_id=100000 + self._next * 1000,
                tokens=self.burst,
                refilled_at=time.monotonic(),
            )
            self._users[email.lower()] = user
            return user

    def user(self, email: str) -> FakeUser:
        return self._users[email.lower()]

    def remove_users(self, emails: Iterable[str]) -> None:
        """Delete users and their mail (a long benchmark frees each round's domain)."""
        with self._lock:
            for email in emails:
                self._users.pop(email.lower(), None)

    def suspend(self, email: str, suspended: bool = True) -> None:
        with self._lock:
            self.user(email).suspended = suspended

    def add_label(self, email: str, name: str) -> str:
        """A user label; returns its opaque id (`Label_<n>`)."""
        with self._lock:
            user = self.user(email)
            self._next += 1
            label_id = f"Label_{self._next}"
            user.labels[label_id] = name
            return label_id

    def add_message(
        self, email: str, raw: bytes, labels: Sequence[str] = ("INBOX",), *, thread: str = ""
    ) -> str:
        """A message delivered now, with these label ids; recorded in the history."""
        with self._lock:
            user = self.user(email)
            self._next += 1
            message_id = f"{0x18C0000000000000 + self._next * 104729:x}"
            user.history_id += HISTORY_STEP
            message = FakeMessage(
                id=message_id,
                thread_id=thread or message_id,
                raw=raw,
                label_ids=list(dict.fromkeys(labels)),
                seq=self._next,
                history_id=user.history_id,
                internal_date=1_700_000_000_000 + self._next * 1000,
            )
            user.messages[message_id] = message
            self._record(user, "messageAdded", message, [])
            return message_id

    def add_messages(
        self, email: str, raws: Iterable[bytes], labels: Sequence[str] = ("INBOX",)
    ) -> list[str]:
        return [self.add_message(email, raw, labels) for raw in raws]

    def modify_labels(
        self, email: str, message_id: str, add: Sequence[str] = (), remove: Sequence[str] = ()
    ) -> None:
        """messages.modify: one history record per kind of change."""
        with self._lock:
            user = self.user(email)
            message = user.messages[message_id]
            added = [label for label in add if label not in message.label_ids]
            removed = [label for label in remove if label in message.label_ids]
            if added:
                message.label_ids.extend(added)
                user.history_id += HISTORY_STEP
                message.history_id = user.history_id
                self._record(user, "labelAdded", message, added)
            if removed:
                message.label_ids = [label for label in message.label_ids if label not in removed]
                user.history_id += HISTORY_STEP
                message.history_id = user.history_id
                self._record(user, "labelRemoved", message, removed)

    def delete_message(self, email: str, message_id: str) -> None:
        with self._lock:
            user = self.user(email)
            message = user.messages[message_id]
            message.deleted = True
            user.history_id += HISTORY_STEP
            self._record(user, "messageDeleted", message, [])

    def vanish_on_get(self, email: str, message_id: str) -> None:
        """Keep listing the message but answer 404 to its get (deleted in between)."""
        with self._lock:
            self.user(email).messages[message_id].gone_on_get = True

    def break_message(self, email: str, message_id: str, status: int = 500) -> None:
        """Every get of this message answers `status` until `repair_message`."""
        with self._lock:
            self.user(email).messages[message_id].failing_status = status

    def repair_message(self, email: str, message_id: str) -> None:
        with self._lock:
            self.user(email).messages[message_id].failing_status = 0

    def expire_history(self, email: str) -> None:
        """Every history id handed out so far is too old: history.list answers 404."""
        with self._lock:
            user = self.user(email)
            user.history_id += HISTORY_STEP
            user.history_floor = user.history_id

    def expire_page_tokens(self) -> None:
        """Every messages.list page token handed out so far answers 400."""
        with self._lock:
            self._page_token_epoch += 1

    def _record(self, user: FakeUser, kind: str, message: FakeMessage, changed: list[str]) -> None:
        user.history.append(
            HistoryRecord(
                user.history_id,
                kind,
                message.id,
                message.thread_id,
                list(message.label_ids),
                changed,
            )
        )

    # --- faults -------------------------------------------------------------------------

    def fail_next(
        self,
        count: int,
        status: int = 429,
        *,
        reason: str | None = None,
        api: str | None = None,
        email: str | None = None,
        retry_after: float | None = None,
        skip: int = 0,
    ) -> None:
        """The next `count` API calls (of `api`, as `email`, when given) answer `status`,
        after `skip` such calls were let through.

        403 is a rate limit (`rateLimitExceeded`) unless `reason` says otherwise.
        """
        with self._lock:
            self._faults.append(
                Fault(
                    status,
                    count,
                    skip,
                    reason or FAULT_TEXTS.get(status, ("backendError",))[0],
                    api,
                    email.lower() if email else None,
                    None if retry_after is None else f"{retry_after:g}",
                )
            )

    # --- what happened ------------------------------------------------------------------

    @property
    def log(self) -> list[Logged]:
        with self._lock:
            return list(self._log)

    def reset_log(self) -> None:
        """Forget the log and the counters (`requests`, `throttled`, `answered`)."""
        with self._lock:
            self._log.clear()
            self.requests = self.throttled = 0
            self.answered.clear()

    def count(
        self, *, api: str | None = None, status: int | None = None, email: str | None = None
    ) -> int:
        return sum(
            1
            for entry in self.log
            if (api is None or entry.api == api)
            and (status is None or entry.status == status)
            and (email is None or entry.email.lower() == email.lower())
        )

    def requested_ids(self, email: str) -> list[str]:
        """The message ids of every messages.get as `email`, in order."""
        return [
            entry.path.rsplit("/", 1)[-1]
            for entry in self.log
            if entry.api == "messages.get" and entry.email.lower() == email.lower()
        ]

    # --- serving ------------------------------------------------------------------------

    def _serve(self, handler: _Handler) -> None:
        url = urllib.parse.urlsplit(handler.path)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        api, email, throttled = "unknown", "", False
        headers: dict[str, str] = {}
        try:
            if handler.command == "POST" and url.path == "/token":
                api = "token"
                answer = self._token(body)
            else:
                api, parts = self._route(handler.command, url.path)
                subject = self._authorize(handler.headers.get("Authorization", ""), api, parts)
                email = subject.email
                counted = self._admit(api, subject)
                try:
                    if self.latency and api in COSTS:
                        time.sleep(self.latency)
                    with self._lock:
                        answer = self._answer(api, subject, parts, query)
                finally:
                    if counted:
                        with self._lock:
                            subject.in_flight -= 1
            status = 200
        except _Reply as reply:
            status, answer, headers, throttled = (
                reply.status,
                reply.body,
                reply.headers,
                reply.throttled,
            )
        with self._lock:
            self.requests += 1
            self.throttled += throttled
            self.answered[api, status] += 1
            if self.keep_log:
                self._log.append(
                    Logged(
                        time.monotonic(),
                        handler.command,
                        api,
                        email,
                        url.path,
                        query,
                        status,
                        throttled,
                    )
                )
        handler.reply(status, answer, headers)

    # token endpoint

    def _token(self, body: bytes) -> Any:
        form = urllib.parse.parse_qs(body.decode("ascii", "replace"))
        if form.get("grant_type", [""])[0] != JWT_BEARER:
            raise _Reply(
                400, {"error": "unsupported_grant_type", "error_description": "Invalid grant_type."}
            )
        assertion = form.get("assertion", [""])[0]
        with self._lock:
            self.assertions.append(assertion)
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            raise _grant_error("Invalid JWT format.") from None
        with self._lock:
            key = self._keys.get(str(header.get("kid")))
        if key is None:
            raise _grant_error("Invalid JWT Signature.")
        try:
            claims = jwt.decode(
                assertion,
                key.public_key_pem,
                algorithms=["RS256"],
                audience=TOKEN_AUDIENCE,
                options={"require": ["exp", "iat", "iss", "aud"]},
            )
        except jwt.InvalidSignatureError:
            raise _grant_error("Invalid JWT Signature.") from None
        except jwt.ExpiredSignatureError:
            raise _grant_error(
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                "reasonable timeframe. Check your iat and exp values in the JWT claim."
            ) from None
        except jwt.InvalidAudienceError:
            raise _grant_error("Invalid JWT: Failed audience check.") from None
        except jwt.PyJWTError as exc:
            raise _grant_error(f"Invalid JWT: {type(exc).__name__}") from None
        if claims["iss"] != key.client_email:
            raise _grant_error("Invalid JWT Signature.")
        scopes = frozenset(str(claims.get("scope") or "").split())
        with self._lock:
            if (
                self.delegation_revoked
                or key.client_email in self._revoked
                or not scopes
                or not scopes <= self._grants.get(key.client_email, set())
            ):
                raise _Reply(
                    401, {"error": "unauthorized_client", "error_description": UNAUTHORIZED_CLIENT}
                )
            subject = str(claims.get("sub") or "")
            if subject:
                user = self._users.get(subject.lower())
                if user is None or user.suspended:
                    raise _grant_error("Invalid email or User ID")
            token = "ya29.fake-" + secrets.token_urlsafe(24)
            self._tokens[token] = _Token(key.client_email, subject, scopes, time.time() + 3600)
            self.issued_tokens.append(token)
        return {"access_token": token, "expires_in": 3599, "token_type": "Bearer"}

    # API calls

    def _route(self, method: str, path: str) -> tuple[str, list[str]]:
        """(api, path parts) of a Directory or Gmail call."""
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
        if method != "GET":
            raise _api_error(405, "methodNotAllowed", "METHOD_NOT_ALLOWED", "Method not allowed.")
        if parts == ["admin", "directory", "v1", "users"]:
            return "users.list", parts
        if len(parts) >= 5 and parts[:3] == ["gmail", "v1", "users"]:
            rest = tuple(parts[4:])
            api = GMAIL_APIS.get(rest)
            if api is None and len(rest) == 2 and rest[0] == "messages":
                api = "messages.get"
            if api is not None:
                return api, parts
        raise _api_error(404, "notFound", "NOT_FOUND", "Not Found")

    def _authorize(self, header: str, api: str, parts: list[str]) -> FakeUser:
        """The user the bearer token acts as, if it may make this call."""
        scope = DIRECTORY_SCOPE if api == "users.list" else GMAIL_SCOPE
        with self._lock:
            token = self._tokens.get(header.removeprefix("Bearer ").strip())
            if token is None or token.expires_at < time.time():
                raise _api_error(
                    401,
                    "authError",
                    "UNAUTHENTICATED",
                    "Request had invalid authentication credentials. Expected OAuth 2 access "
                    "token, login cookie or other valid authentication credential.",
                )
            if scope not in token.scopes:
                raise _api_error(
                    403,
                    "insufficientPermissions",
                    "PERMISSION_DENIED",
                    "Request had insufficient authentication scopes.",
                )
            subject = self._users.get(token.subject.lower())
            if api == "users.list":
                if subject is None or not subject.admin:
                    raise _api_error(
                        403,
                        "forbidden",
                        "PERMISSION_DENIED",
                        "Not Authorized to access this resource/api",
                    )
                return subject
            named = parts[3]
            if subject is None or named.lower() not in ("me", subject.email.lower()):
                raise _api_error(
                    403, "forbidden", "PERMISSION_DENIED", f"Delegation denied for {named}"
                )
            return subject

    def _admit(self, api: str, user: FakeUser) -> bool:
        """Injected faults, then (Gmail calls) Gmail being off, the quota and the
        in-flight cap; True when the call now counts as in flight."""
        with self._lock:
            for fault in self._faults:
                if fault.remaining <= 0:
                    continue
                if fault.api not in (None, api) or fault.email not in (None, user.email.lower()):
                    continue
                if fault.skip > 0:
                    fault.skip -= 1
                    continue
                fault.remaining -= 1
                _, status_name, message = FAULT_TEXTS.get(
                    fault.status, (fault.reason, "UNKNOWN", "Injected failure.")
                )
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                raise _api_error(fault.status, fault.reason, status_name, message, headers)
            cost = COSTS.get(api)
            if cost is None:
                return False
            if not user.gmail:
                raise _api_error(
                    400, "failedPrecondition", "FAILED_PRECONDITION", "Mail service not enabled"
                )
            if self.quota:
                now = time.monotonic()
                user.tokens = min(self.burst, user.tokens + (now - user.refilled_at) * self.rate)
                user.refilled_at = now
                if user.tokens < cost:
                    raise _api_error(
                        429,
                        "rateLimitExceeded",
                        "RESOURCE_EXHAUSTED",
                        "User-rate limit exceeded.  Retry after a second",
                        {"Retry-After": "1"},
                        throttled=True,
                    )
                user.tokens -= cost
            cap = self.max_in_flight_per_user
            if cap is not None and user.in_flight >= cap:
                raise _api_error(
                    429,
                    "rateLimitExceeded",
                    "RESOURCE_EXHAUSTED",
                    "Too many concurrent requests for user",
                    throttled=True,
                )
            user.units += cost
            user.in_flight += 1
            user.peak_in_flight = max(user.peak_in_flight, user.in_flight)
            return True

    def _answer(
        self, api: str, subject: FakeUser, parts: list[str], query: dict[str, list[str]]
    ) -> Any:
        if api == "users.list":
            return self._users_list(query)
        if api == "users.getProfile":
            live = [m for m in subject.messages.values() if not m.deleted]
            return _fields(
                {
                    "emailAddress": subject.email,
                    "messagesTotal": len(live),
                    "threadsTotal": len({m.thread_id for m in live}),
                    "historyId": str(subject.history_id),
                },
                query,
            )
        if api == "labels.list":
            labels = [{"id": label, "name": label, "type": "system"} for label in SYSTEM_LABELS] + [
                {"id": i, "name": n, "type": "user"} for i, n in subject.labels.items()
            ]
            return {"labels": labels}
        if api == "messages.list":
            return self._messages_list(subject, query)
        if api == "messages.get":
            return self._message_get(subject, parts[-1], query)
        if api == "history.list":
            return self._history_list(subject, query)
        raise _api_error(404, "notFound", "NOT_FOUND", "Not Found")

    def _users_list(self, query: dict[str, list[str]]) -> Any:
        if _one(query, "customer") != "my_customer":
            raise _api_error(400, "badRequest", "INVALID_ARGUMENT", "Bad Request")
        users = sorted(self._users.values(), key=lambda u: u.email.lower())
        size = min(int(_one(query, "maxResults") or 100), self.users_page_size)
        start = int(_one(query, "pageToken") or 0)
        page = users[start : start + size]
        answer: dict[str, Any] = {
            "kind": "admin#directory#users",
            "users": [
                {
                    "kind": "admin#directory#user",
                    "id": u.id,
                    "primaryEmail": u.email,
                    "suspended": u.suspended,
                    "isAdmin": u.admin,
                }
                for u in page
            ],
        }
        if start + size < len(users):
            answer["nextPageToken"] = str(start + size)
        return answer

    def _messages_list(self, user: FakeUser, query: dict[str, list[str]]) -> Any:
        include_spam_trash = _one(query, "includeSpamTrash") == "true"
        wanted = set(query.get("labelIds") or ())
        listed = [
            m
            for m in sorted(user.messages.values(), key=lambda m: -m.seq)
            if not m.deleted
            and (include_spam_trash or not {"SPAM", "TRASH"} & set(m.label_ids))
            and wanted <= set(m.label_ids)
        ]
        token = _one(query, "pageToken")
        if token:
            epoch, _, after = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
            if int(epoch) != self._page_token_epoch:
                raise _api_error(400, "invalidArgument", "INVALID_ARGUMENT", "Invalid pageToken")
            listed = [m for m in listed if m.seq < int(after)]
        size = min(int(_one(query, "maxResults") or 100), self.page_size)
        page = listed[:size]
        answer: dict[str, Any] = {"resultSizeEstimate": len(listed)}
        if page:
            answer["messages"] = [{"id": m.id, "threadId": m.thread_id} for m in page]
        if len(listed) > size:
            token = f"{self._page_token_epoch}:{page[-1].seq}"
            answer["nextPageToken"] = base64.urlsafe_b64encode(token.encode()).decode()
        return answer

    def _message_get(self, user: FakeUser, message_id: str, query: dict[str, list[str]]) -> Any:
        message = user.messages.get(message_id)
        if message is None or message.deleted or message.gone_on_get:
            raise _api_error(404, "notFound", "NOT_FOUND", "Requested entity was not found.")
        if message.failing_status:
            _, status_name, text = FAULT_TEXTS.get(
                message.failing_status,
                ("failedPrecondition", "FAILED_PRECONDITION", "Precondition check failed."),
            )
            reason = FAULT_TEXTS.get(message.failing_status, ("failedPrecondition",))[0]
            raise _api_error(message.failing_status, reason, status_name, text)
        answer: dict[str, Any] = {
            "id": message.id,
            "threadId": message.thread_id,
            "labelIds": list(message.label_ids),
            "snippet": "",
            "sizeEstimate": len(message.raw),
            "historyId": str(message.history_id),
            "internalDate": str(message.internal_date),
        }
        if (_one(query, "format") or "full") == "raw":
            answer["raw"] = base64.urlsafe_b64encode(message.raw).decode("ascii").rstrip("=")
        return _fields(answer, query)

    def _history_list(self, user: FakeUser, query: dict[str, list[str]]) -> Any:
        start_text = _one(query, "startHistoryId")
        if not start_text:
            raise _api_error(400, "invalidArgument", "INVALID_ARGUMENT", "Missing startHistoryId")
        start = int(start_text)
        if start < user.history_floor:
            raise _api_error(404, "notFound", "NOT_FOUND", "Requested entity was not found.")
        types = set(query.get("historyTypes") or ())
        token = _one(query, "pageToken")
        after = int(token) if token else start
        records = [r for r in user.history if r.id > after and (not types or r.kind in types)]
        size = min(int(_one(query, "maxResults") or 100), self.history_page_size)
        page = records[:size]
        answer: dict[str, Any] = {"historyId": str(user.history_id)}
        if page:
            answer["history"] = [_history_json(r) for r in page]
        if len(records) > size:
            answer["nextPageToken"] = str(page[-1].id)
        return answer


def _history_json(record: HistoryRecord) -> dict[str, Any]:
    message = {"id": record.message_id, "threadId": record.thread_id}
    with_labels = {**message, "labelIds": list(record.labels_now)}
    out: dict[str, Any] = {"id": str(record.id), "messages": [message]}
    if record.kind == "messageAdded":
        out["messagesAdded"] = [{"message": with_labels}]
    elif record.kind == "labelAdded":
        out["labelsAdded"] = [{"message": with_labels, "labelIds": list(record.changed)}]
    elif record.kind == "labelRemoved":
        out["labelsRemoved"] = [{"message": with_labels, "labelIds": list(record.changed)}]
    elif record.kind == "messageDeleted":
        out["messagesDeleted"] = [{"message": message}]
    return out


def _one(query: dict[str, list[str]], name: str) -> str:
    values = query.get(name)
    return values[0] if values else ""


def _fields(answer: dict[str, Any], query: dict[str, list[str]]) -> dict[str, Any]:
    """Honour `fields` loosely: keep the top-level members it names."""
    selector = _one(query, "fields")
    if not selector:
        return answer
    names, depth, current = set(), 0, ""
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            names.add(current.strip())
            current = ""
        elif depth == 0:
            current += char
    names.add(current.strip())
    return {k: v for k, v in answer.items() if k in names}


def _grant_error(description: str) -> _Reply:
    return _Reply(400, {"error": "invalid_grant", "error_description": description})


def _api_error(
    status: int,
    reason: str,
    status_name: str,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    throttled: bool = False,
) -> _Reply:
    body = {
        "error": {
            "code": status,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
            "status": status_name,
        }
    }
    return _Reply(status, body, headers, throttled)


class _Handler(BaseHTTPRequestHandler):
    # Keep-alive, as Google serves: httplib2 reuses one connection per thread.
    protocol_version = "HTTP/1.1"
    timeout = 30

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without this, Nagle's algorithm
        # holds the body for the client's delayed ACK (tens of ms a request).
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self.server.fake._serve(self)  # type: ignore[attr-defined]

    do_POST = do_GET

    def reply(self, status: int, answer: Any, headers: dict[str, str]) -> None:
        body = json.dumps(answer, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the fake's log is `FakeGoogle.log`."""
