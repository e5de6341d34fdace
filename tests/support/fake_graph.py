"""A local HTTPS fake of the Microsoft identity platform and of Microsoft Graph.

Usage::

    with FakeGraph() as fake:                         # https://127.0.0.1:PORT
        alice = fake.add_user("alice@contoso.example") # Inbox, Drafts, ... created
        inbox = alice.folder("Inbox")
        ids = fake.add_messages(alice, inbox, [raw1, raw2])
        fake.url, fake.ca_path                         # endpoint, and the CA to trust
        fake.tenant_id, fake.client_id, fake.client_secret

It speaks the wire protocol the real msal and an HTTP client see: the tenant's OpenID
configuration and token endpoint (client credentials: AADSTS90002 for an unknown
tenant, 700016 for an unknown client, 7000215 / 7000222 for a wrong or expired
secret, 500011 for a scope that is not `{url}/.default`), and Graph's `/v1.0/users`,
`mailFolders` / `childFolders` (hidden folders only with includeHiddenFolders=true),
per-folder `messages/delta` (pages sized by `Prefer: odata.maxpagesize`, nextLink /
deltaLink rounds, `@removed` entries, expired tokens) and `messages/{id}/$value`, with
Graph's error bodies. Message ids are immutable ids only when the request says
`Prefer: IdType="ImmutableId"`; otherwise a message's id changes when it moves.

Each mailbox request counts against that mailbox: more than `concurrency_limit` at
once gets 429 MailboxConcurrency, more than `budget` in `budget_window` seconds gets
429 ApplicationThrottled, both with Retry-After. `stats(user)` reports the requests,
the 429s and the peak number in flight (counting the rejected ones, so a client that
sends a 5th request at once shows a peak of 5). A request counts as in flight from its
arrival until its response is ready to be written: never longer than the client's
own request, so a client within the limit is never throttled by timing alone.

The TLS certificate (for 127.0.0.1 and localhost) is issued by a test CA generated
once per process; a test trusts it by pointing REQUESTS_CA_BUNDLE at `ca_path`.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import datetime as dt
import ipaddress
import json
import math
import secrets
import shutil
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["FakeFolder", "FakeGraph", "FakeUser", "LoggedRequest", "MailboxStats"]

HOST = "127.0.0.1"
STANDARD_FOLDERS = (
    "Inbox",
    "Drafts",
    "Sent Items",
    "Deleted Items",
    "Junk Email",
    "Archive",
    "Outbox",
)
PERMISSIONS = frozenset({"User.Read.All", "Mail.Read"})
WRITE_CHUNK = 64 * 1024


# --- TLS material ---------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    ca_path: Path
    cert_path: Path
    key_path: Path


@cache
def certificates() -> Certificates:
    """A test CA and a server certificate it issued for 127.0.0.1 and localhost."""
    directory = Path(tempfile.mkdtemp(prefix="fake-graph-tls-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ingestion-grpc test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = Certificates(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    paths.ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


# --- the tenant's data ----------------------------------------------------------------


@dataclass(eq=False)
class FakeFolder:
    id: str
    name: str
    user: FakeUser
    parent: FakeFolder | None
    hidden: bool
    children: list[FakeFolder] = field(default_factory=list)
    # (sequence number, immutable message id, "added" | "removed"), in order.
    log: list[tuple[int, str, str]] = field(default_factory=list)
    # Delta tokens carry the epoch they were issued in; expire_delta starts a new one.
    epoch: int = 0
    expiry: tuple[int, str] = (410, "SyncStateNotFound")

    @property
    def path(self) -> str:
        return f"{self.parent.path}/{self.name}" if self.parent else self.name

    def __repr__(self) -> str:
        return f"FakeFolder({self.path!r}, hidden={self.hidden})"


@dataclass(eq=False)
class FakeMessage:
    id: str  # the immutable id
    raw: bytes
    folder: FakeFolder
    serial: int
    deleted: bool = False

    def rest_id(self, folder: FakeFolder | None = None) -> str:
        # A REST id names the folder: it changes when the message moves, as Exchange's do.
        where = folder or self.folder
        return f"AAMkR{self.serial}-{where.id[-12:]}"


@dataclass(eq=False)
class FakeUser:
    id: str
    upn: str
    mail: str | None
    user_type: str
    has_mailbox: bool
    roots: list[FakeFolder] = field(default_factory=list)
    folders: dict[str, FakeFolder] = field(default_factory=dict)
    messages: dict[str, FakeMessage] = field(default_factory=dict)
    # Limits bookkeeping.
    in_flight: int = 0
    peak: int = 0
    requests: int = 0
    throttled: int = 0
    accepted_at: deque[float] = field(default_factory=deque)
    injected: deque[tuple[int, str, int]] = field(default_factory=deque)

    def __repr__(self) -> str:
        return f"FakeUser({self.upn!r})"

    def folder(self, path: str) -> FakeFolder:
        for folder in self.folders.values():
            if folder.path == path:
                return folder
        raise KeyError(path)


@dataclass
class FakeApp:
    client_id: str
    secret: str
    permissions: set[str]
    secret_expired: bool = False


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str  # decoded, without the query
    query: dict[str, str]
    user_id: str | None
    status: int
    immutable_ids: bool
    # time.monotonic() when the request arrived and when its answer was ready.
    started: float = 0.0
    ended: float = 0.0


@dataclass(frozen=True)
class MailboxStats:
    requests: int
    throttled: int
    peak_concurrency: int


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


def _json(status: int, data: Any, **headers: str) -> _Response:
    body = json.dumps(data, ensure_ascii=False).encode("utf-8")
    return _Response(status, body, dict(headers), "application/json; charset=utf-8")


def _graph_error(status: int, code: str, message: str, **headers: str) -> _Response:
    inner = {"date": dt.datetime.now(dt.UTC).isoformat(), "request-id": str(uuid.uuid4())}
    return _json(
        status, {"error": {"code": code, "message": message, "innerError": inner}}, **headers
    )


def _aad_error(status: int, error: str, code: int, description: str) -> _Response:
    trace = str(uuid.uuid4())
    now = f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%SZ}"
    return _json(
        status,
        {
            "error": error,
            "error_description": f"AADSTS{code}: {description} Trace ID: {trace} "
            f"Correlation ID: {uuid.uuid4()} Timestamp: {now}",
            "error_codes": [code],
            "timestamp": now,
            "trace_id": trace,
            "correlation_id": str(uuid.uuid4()),
        },
    )


def _encode_token(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _decode_token(token: str) -> dict[str, Any] | None:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _opaque_id(prefix: str) -> str:
    # Graph ids are base64 with "=" padding: the client has to quote them in paths.
    return prefix + secrets.token_urlsafe(18) + "AAA="


class FakeGraph:
    """See the module docstring. Knobs are plain attributes, read on every request."""

    def __init__(
        self,
        *,
        tenant_domain: str = "contoso.example",
        latency: float = 0.0,
    ) -> None:
        self.tenant_id = str(uuid.uuid4())
        self.tenant_domain = tenant_domain
        self.client_id = str(uuid.uuid4())
        # Per mailbox request: seconds a request takes (while it counts as in flight).
        self.latency = latency
        self.concurrency_limit: int | None = 4
        self.concurrency_retry_after = 1
        self.budget: int | None = None
        self.budget_window = 600.0
        self.max_users_page = 999
        self.max_folders_page = 250
        self.max_delta_page = 1000
        self.token_lifetime = 3599
        self.token_requests = 0
        self.issued_tokens: list[str] = []
        self.requests: list[LoggedRequest] = []
        self._lock = threading.RLock()
        self._seq = 0
        self._serial = 0
        self._apps: dict[str, FakeApp] = {}
        self._tokens: dict[str, tuple[FakeApp, float]] = {}
        self._users: list[FakeUser] = []
        self._messages: dict[str, FakeMessage] = {}
        self._rest: dict[str, FakeMessage] = {}
        self._value_failures: dict[str, list[Any]] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.client_secret = self.add_app(self.client_id).secret

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> FakeGraph:
        tls = certificates()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.cert_path, tls.key_path)
        self._server = _Server(self, context)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # how long stop() waits for the loop
            name="fake-graph",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeGraph:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake first"
        return f"https://{HOST}:{self._server.server_address[1]}"

    @property
    def ca_path(self) -> Path:
        return certificates().ca_path

    # --- identity -----------------------------------------------------------------------

    def add_app(
        self,
        client_id: str | None = None,
        *,
        permissions: Iterable[str] = PERMISSIONS,
    ) -> FakeApp:
        """An app registration with a fresh secret and the given application permissions."""
        app = FakeApp(client_id or str(uuid.uuid4()), _secret(), set(permissions))
        with self._lock:
            self._apps[app.client_id] = app
        return app

    def rotate_secret(self, client_id: str | None = None) -> str:
        """A new secret for the app; the old one stops working (tokens already issued
        keep working until they expire, as with Entra ID)."""
        with self._lock:
            app = self._apps[client_id or self.client_id]
            app.secret = _secret()
            app.secret_expired = False
            if app.client_id == self.client_id:
                self.client_secret = app.secret
            return app.secret

    def expire_secret(self, client_id: str | None = None) -> None:
        with self._lock:
            self._apps[client_id or self.client_id].secret_expired = True

    def expire_tokens(self) -> None:
        """Every access token issued so far is refused from now on (401)."""
        with self._lock:
            self._tokens = {token: (app, 0.0) for token, (app, _) in self._tokens.items()}

    # --- directory and mailboxes -----------------------------------------------------------

    def add_user(
        self,
        upn: str,
        *,
        mailbox: bool = True,
        guest: bool = False,
        standard_folders: bool = True,
    ) -> FakeUser:
        user = FakeUser(
            id=str(uuid.uuid4()),
            upn=upn,
            mail=None if guest else upn,
            user_type="Guest" if guest else "Member",
            has_mailbox=mailbox and not guest,
        )
        with self._lock:
            self._users.append(user)
        if user.has_mailbox and standard_folders:
            for name in STANDARD_FOLDERS:
                self.add_folder(user, name)
        return user

    def add_folder(
        self,
        user: FakeUser,
        name: str,
        parent: FakeFolder | str | None = None,
        *,
        hidden: bool = False,
    ) -> FakeFolder:
        with self._lock:
            above = user.folder(parent) if isinstance(parent, str) else parent
            folder = FakeFolder(_opaque_id("AAMkAF"), name, user, above, hidden)
            (above.children if above else user.roots).append(folder)
            user.folders[folder.id] = folder
            return folder

    def remove_user(self, user: FakeUser) -> None:
        """The user leaves the directory, with its mail (a long-running fake frees it)."""
        with self._lock:
            self._users.remove(user)
            for message in user.messages.values():
                self._messages.pop(message.id, None)
                self._rest.pop(message.rest_id(), None)
                self._value_failures.pop(message.id, None)
            user.messages.clear()
            user.folders.clear()
            user.roots.clear()

    def delete_folder(self, user: FakeUser, folder: FakeFolder) -> None:
        with self._lock:
            for child in list(folder.children):
                self.delete_folder(user, child)
            for message in list(user.messages.values()):
                if message.folder is folder and not message.deleted:
                    self.delete_message(user, message.id)
            (folder.parent.children if folder.parent else user.roots).remove(folder)
            del user.folders[folder.id]

    def add_message(self, user: FakeUser, folder: FakeFolder, raw: bytes) -> str:
        """The message's immutable id."""
        return self.add_messages(user, folder, [raw])[0]

    def add_messages(self, user: FakeUser, folder: FakeFolder, raws: Iterable[bytes]) -> list[str]:
        ids = []
        with self._lock:
            for raw in raws:
                self._serial += 1
                message = FakeMessage(_opaque_id("AAkALg"), raw, folder, self._serial)
                user.messages[message.id] = message
                self._messages[message.id] = message
                self._rest[message.rest_id()] = message
                folder.log.append((self._next_seq(), message.id, "added"))
                ids.append(message.id)
        return ids

    def move_message(self, user: FakeUser, message_id: str, folder: FakeFolder) -> None:
        with self._lock:
            message = user.messages[message_id]
            del self._rest[message.rest_id()]
            message.folder.log.append((self._next_seq(), message.id, "removed"))
            message.folder = folder
            folder.log.append((self._next_seq(), message.id, "added"))
            self._rest[message.rest_id()] = message

    def change_message(self, user: FakeUser, message_id: str) -> None:
        """A change (read, flagged): the message comes again in its folder's delta."""
        with self._lock:
            message = user.messages[message_id]
            message.folder.log.append((self._next_seq(), message.id, "added"))

    def delete_message(self, user: FakeUser, message_id: str) -> None:
        with self._lock:
            message = user.messages[message_id]
            message.deleted = True
            self._rest.pop(message.rest_id(), None)
            message.folder.log.append((self._next_seq(), message.id, "removed"))

    def fail_value(
        self,
        message_id: str,
        *,
        times: int | None = None,
        status: int = 500,
        code: str = "UnknownError",
    ) -> None:
        """`$value` of the message answers `status` `times` times (None: until cleared)."""
        with self._lock:
            self._value_failures[message_id] = [times, status, code]

    def clear_failures(self) -> None:
        with self._lock:
            self._value_failures.clear()

    def expire_delta(
        self, folder: FakeFolder, *, status: int = 410, code: str = "SyncStateNotFound"
    ) -> None:
        """Every delta token (nextLink and deltaLink) issued for the folder is refused."""
        with self._lock:
            folder.epoch += 1
            folder.expiry = (status, code)

    def throttle(
        self,
        user: FakeUser,
        times: int,
        *,
        status: int = 429,
        code: str = "ApplicationThrottled",
        retry_after: int = 1,
    ) -> None:
        """The user's next `times` mailbox requests answer `status` with Retry-After."""
        with self._lock:
            user.injected.extend([(status, code, retry_after)] * times)

    # --- observations -----------------------------------------------------------------------

    def user(self, key: str) -> FakeUser:
        """The user with this object id or userPrincipalName (case-insensitive)."""
        user = self._user(key)
        if user is None:
            raise KeyError(key)
        return user

    def stats(self, user: FakeUser) -> MailboxStats:
        with self._lock:
            return MailboxStats(user.requests, user.throttled, user.peak)

    def value_requests(self, user: FakeUser | None = None) -> Counter[str]:
        """How many `$value` requests each message (by immutable id) got, answered or not."""
        counts: Counter[str] = Counter()
        with self._lock:
            for request in self.requests:
                if request.path.endswith("/$value") and (
                    user is None or request.user_id == user.id
                ):
                    token = request.path.split("/")[-2]
                    message = self._messages.get(token) or self._rest.get(token)
                    counts[message.id if message else token] += 1
        return counts

    def requests_to(self, user: FakeUser, suffix: str) -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self.requests if r.user_id == user.id and r.path.endswith(suffix)]

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self.token_requests = 0
            for user in self._users:
                user.requests = user.throttled = user.peak = 0

    # --- request handling ---------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _tenant_known(self, name: str) -> bool:
        return name.casefold() in (self.tenant_id.casefold(), self.tenant_domain.casefold())

    def handle(self, handler: _Handler, method: str, body: bytes) -> _Response:
        started = time.monotonic()
        parts = urlsplit(handler.path)
        segments = [unquote(s) for s in parts.path.split("/")[1:]]
        query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        prefs = _preferences(handler.headers.get_all("Prefer") or [])
        user: FakeUser | None = None
        if segments[:1] == ["v1.0"]:
            response, user = self._graph(handler, method, segments, query, prefs)
        elif segments[1:] == ["v2.0", ".well-known", "openid-configuration"] and method == "GET":
            response = self._openid(segments[0])
        elif segments[1:] == ["oauth2", "v2.0", "token"] and method == "POST":
            response = self._token(segments[0], body, handler.headers.get("Authorization", ""))
        else:
            response = _json(404, {"error": "not_found"})
        with self._lock:
            self.requests.append(
                LoggedRequest(
                    method,
                    unquote(parts.path),
                    query,
                    user.id if user else None,
                    response.status,
                    prefs.get("idtype", "").casefold() == "immutableid",
                    started,
                    time.monotonic(),
                )
            )
        return response

    def _openid(self, tenant: str) -> _Response:
        if not self._tenant_known(tenant):
            return _json(
                400,
                {
                    "error": "invalid_tenant",
                    "error_description": f"AADSTS90002: Tenant '{tenant}' not found. Check to "
                    "make sure you have the correct tenant ID and are signing into the correct "
                    "cloud.",
                    "error_codes": [90002],
                },
            )
        base = f"{self.url}/{self.tenant_id}"
        return _json(
            200,
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "issuer": f"{base}/v2.0",
                "jwks_uri": f"{self.url}/{self.tenant_id}/discovery/v2.0/keys",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "response_types_supported": ["code", "id_token", "code id_token", "token id_token"],
                "tenant_region_scope": "EU",
            },
        )

    def _token(self, tenant: str, body: bytes, authorization: str) -> _Response:
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        if authorization.startswith("Basic "):
            decoded = base64.b64decode(authorization[6:]).decode("utf-8", "replace")
            client_id, _, secret = decoded.partition(":")
        with self._lock:
            self.token_requests += 1
            if not self._tenant_known(tenant):
                return _aad_error(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
            app = self._apps.get(client_id)
            if app is None:
                return _aad_error(
                    400,
                    "unauthorized_client",
                    700016,
                    f"Application with identifier '{client_id}' was not found in the directory "
                    f"'{self.tenant_domain}'.",
                )
            if form.get("grant_type") != "client_credentials":
                return _aad_error(400, "unsupported_grant_type", 70003, "The grant is unsupported.")
            if app.secret_expired:
                return _aad_error(
                    401,
                    "invalid_client",
                    7000222,
                    f"The provided client secret keys for app '{client_id}' are expired.",
                )
            if not secrets.compare_digest(secret.encode(), app.secret.encode()):
                return _aad_error(
                    401,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request "
                    f"is the client secret value, not the client secret ID, for a secret added to "
                    f"app '{client_id}'.",
                )
            scope = form.get("scope", "")
            if scope != f"{self.url}/.default":
                return _aad_error(
                    400,
                    "invalid_resource",
                    500011,
                    f"The resource principal named {scope.removesuffix('.default')} was not "
                    f"found in the tenant named {self.tenant_domain}.",
                )
            token = "fake-at." + secrets.token_urlsafe(32)
            self._tokens[token] = (app, time.time() + self.token_lifetime)
            self.issued_tokens.append(token)
        return _json(
            200,
            {
                "token_type": "Bearer",
                "expires_in": self.token_lifetime,
                "ext_expires_in": self.token_lifetime,
                "access_token": token,
            },
        )

    def _graph(
        self,
        handler: _Handler,
        method: str,
        segments: list[str],
        query: dict[str, str],
        prefs: dict[str, str],
    ) -> tuple[_Response, FakeUser | None]:
        app, refusal = self._authenticate(handler.headers.get("Authorization", ""))
        if refusal is not None:
            return refusal, None
        assert app is not None
        if method != "GET" or segments[1:2] != ["users"]:
            return _graph_error(400, "BadRequest", "Unsupported request."), None
        if len(segments) == 2:
            if "User.Read.All" not in app.permissions:
                return _denied_directory(), None
            return self._list_users(query), None
        user = self._user(segments[2])
        if user is None:
            return _graph_error(404, "ResourceNotFound", f"User not found: {segments[2]}"), None
        return self._mailbox_request(user, app, segments[3:], query, prefs), user

    def _authenticate(self, header: str) -> tuple[FakeApp | None, _Response | None]:
        challenge = {"WWW-Authenticate": 'Bearer realm="", error="invalid_token"'}
        if not header.startswith("Bearer "):
            return None, _graph_error(
                401, "InvalidAuthenticationToken", "Access token is empty.", **challenge
            )
        with self._lock:
            entry = self._tokens.get(header[7:])
        if entry is None:
            return None, _graph_error(
                401, "InvalidAuthenticationToken", "IDX14100: JWT is not well formed.", **challenge
            )
        app, expires_at = entry
        if time.time() >= expires_at:
            return None, _graph_error(
                401,
                "InvalidAuthenticationToken",
                "Lifetime validation failed, the token is expired.",
                **challenge,
            )
        return app, None

    def _user(self, key: str) -> FakeUser | None:
        with self._lock:
            for user in self._users:
                if key == user.id or key.casefold() == user.upn.casefold():
                    return user
        return None

    def _list_users(self, query: dict[str, str]) -> _Response:
        with self._lock:
            users = list(self._users)
        offset = int((_decode_token(query.get("$skiptoken", "")) or {}).get("o", 0))
        top = min(int(query.get("$top") or 100), self.max_users_page)
        chosen = users[offset : offset + top]
        fields = [f for f in query.get("$select", "").split(",") if f]
        rows = []
        for user in chosen:
            row = {
                "id": user.id,
                "userPrincipalName": user.upn,
                "mail": user.mail,
                "userType": user.user_type,
                "displayName": user.upn.split("@")[0],
                "accountEnabled": True,
            }
            rows.append({k: v for k, v in row.items() if not fields or k in fields})
        data: dict[str, Any] = {"@odata.context": f"{self.url}/v1.0/$metadata#users", "value": rows}
        if offset + top < len(users):
            rest = {k: v for k, v in query.items() if k != "$skiptoken"}
            rest["$skiptoken"] = _encode_token({"o": offset + top})
            data["@odata.nextLink"] = f"{self.url}/v1.0/users?{encode_query(rest)}"
        return _json(200, data)

    def _mailbox_request(
        self,
        user: FakeUser,
        app: FakeApp,
        rest: list[str],
        query: dict[str, str],
        prefs: dict[str, str],
    ) -> _Response:
        now = time.monotonic()
        rejection: tuple[int, str, int] | None = None
        with self._lock:
            user.requests += 1
            user.in_flight += 1
            user.peak = max(user.peak, user.in_flight)
            window = user.accepted_at
            while window and window[0] <= now - self.budget_window:
                window.popleft()
            if user.injected:
                rejection = user.injected.popleft()
            elif self.concurrency_limit is not None and user.in_flight > self.concurrency_limit:
                rejection = (429, "MailboxConcurrency", self.concurrency_retry_after)
            elif self.budget is not None and len(window) >= self.budget:
                wait = math.ceil(window[0] + self.budget_window - now)
                rejection = (429, "ApplicationThrottled", max(1, wait))
            else:
                window.append(now)
            if rejection is not None and rejection[0] == 429:
                user.throttled += 1
        try:
            if rejection is not None:
                status, code, retry_after = rejection
                return _graph_error(
                    status,
                    code,
                    "Application is over its MailboxConcurrency limit."
                    if code == "MailboxConcurrency"
                    else "Too many requests, please retry later.",
                    **{"Retry-After": str(retry_after)},
                )
            if self.latency:
                time.sleep(self.latency)
            if not user.has_mailbox:
                return _graph_error(
                    404,
                    "MailboxNotEnabledForRESTAPI",
                    "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
                )
            if "Mail.Read" not in app.permissions:
                return _graph_error(
                    403, "ErrorAccessDenied", "Access is denied. Check credentials and try again."
                )
            with self._lock:
                return self._mailbox_route(user, rest, query, prefs)
        finally:
            with self._lock:
                user.in_flight -= 1

    def _mailbox_route(
        self, user: FakeUser, rest: list[str], query: dict[str, str], prefs: dict[str, str]
    ) -> _Response:
        immutable = prefs.get("idtype", "").casefold() == "immutableid"
        base = f"{self.url}/v1.0/users/{quote(user.id, safe='')}"
        hidden = query.get("includeHiddenFolders", "").casefold() == "true"
        if rest == ["mailFolders"]:
            return self._folder_page(user.roots, hidden, query, f"{base}/mailFolders")
        if len(rest) >= 2 and rest[0] == "mailFolders":
            folder = user.folders.get(rest[1])
            if folder is None:
                return _graph_error(
                    404, "ErrorItemNotFound", "The specified object was not found in the store."
                )
            folder_base = f"{base}/mailFolders/{quote(folder.id, safe='')}"
            if rest[2:] == ["childFolders"]:
                return self._folder_page(
                    folder.children, hidden, query, f"{folder_base}/childFolders"
                )
            if rest[2:] == ["messages", "delta"]:
                return self._delta(folder, query, prefs, immutable, f"{folder_base}/messages/delta")
        if len(rest) == 3 and rest[0] == "messages" and rest[2] == "$value":
            return self._value(user, rest[1])
        return _graph_error(400, "BadRequest", "Resource not found for the segment.")

    def _folder_page(
        self, folders: Sequence[FakeFolder], hidden: bool, query: dict[str, str], base: str
    ) -> _Response:
        visible = [f for f in folders if hidden or not f.hidden]
        skip = int(query.get("$skip") or 0)
        top = min(int(query.get("$top") or 10), self.max_folders_page)
        fields = [f for f in query.get("$select", "").split(",") if f]
        rows = []
        for folder in visible[skip : skip + top]:
            row = {
                "id": folder.id,
                "displayName": folder.name,
                "parentFolderId": folder.parent.id if folder.parent else "AAMkRoot",
                # Counts visible children only: a client that trusts it misses hidden ones.
                "childFolderCount": sum(1 for c in folder.children if not c.hidden),
                "unreadItemCount": 0,
                "totalItemCount": sum(
                    1 for m in folder.user.messages.values() if m.folder is folder and not m.deleted
                ),
                "isHidden": folder.hidden,
            }
            rows.append({k: v for k, v in row.items() if not fields or k in fields or k == "id"})
        data: dict[str, Any] = {"value": rows}
        if skip + top < len(visible):
            data["@odata.nextLink"] = f"{base}?{encode_query({**query, '$skip': str(skip + top)})}"
        return _json(200, data)

    def _delta(
        self,
        folder: FakeFolder,
        query: dict[str, str],
        prefs: dict[str, str],
        immutable: bool,
        base: str,
    ) -> _Response:
        token_text = query.get("$skiptoken") or query.get("$deltatoken")
        if token_text:
            token = _decode_token(token_text)
            if token is None or token.get("e") != folder.epoch or token.get("f") != folder.id:
                status, code = folder.expiry
                return _graph_error(status, code, "The sync state is not found or has expired.")
            since = int(token["s"])
            upto = int(token["u"]) if "$skiptoken" in query else self._seq
            offset = int(token.get("o", 0)) if "$skiptoken" in query else 0
        else:
            since, upto, offset = 0, self._seq, 0
        changes = _round(folder, since, upto, initial=since == 0)
        size = min(int(prefs.get("odata.maxpagesize") or 10), self.max_delta_page)
        rows = []
        for message_id, kind in changes[offset : offset + size]:
            message = self._messages[message_id]
            shown = message.id if immutable else message.rest_id(folder)
            if kind == "removed":
                rows.append({"id": shown, "@removed": {"reason": "deleted"}})
            else:
                rows.append(
                    {
                        "@odata.type": "#microsoft.graph.message",
                        "@odata.etag": f'W/"{message.serial}"',
                        "id": shown,
                    }
                )
        data: dict[str, Any] = {"value": rows}
        keep = {k: v for k, v in query.items() if k not in ("$skiptoken", "$deltatoken")}
        if offset + size < len(changes):
            state = {"f": folder.id, "e": folder.epoch, "s": since, "u": upto, "o": offset + size}
            data["@odata.nextLink"] = (
                f"{base}?{encode_query({**keep, '$skiptoken': _encode_token(state)})}"
            )
        else:
            state = {"f": folder.id, "e": folder.epoch, "s": upto}
            data["@odata.deltaLink"] = (
                f"{base}?{encode_query({**keep, '$deltatoken': _encode_token(state)})}"
            )
        applied = [f"odata.maxpagesize={size}"] + (['IdType="ImmutableId"'] if immutable else [])
        return _json(200, data, **{"Preference-Applied": ", ".join(applied)})

    def _value(self, user: FakeUser, key: str) -> _Response:
        message = user.messages.get(key) or self._rest.get(key)
        if message is None or message.deleted or message.folder.user is not user:
            return _graph_error(
                404, "ErrorItemNotFound", "The specified object was not found in the store."
            )
        failure = self._value_failures.get(message.id)
        if failure is not None:
            times, status, code = failure
            if times is None or times > 0:
                if times is not None:
                    failure[0] = times - 1
                return _graph_error(status, code, "The server failed to serve the item.")
        return _Response(200, message.raw, {}, "text/plain")


def _round(folder: FakeFolder, since: int, upto: int, *, initial: bool) -> list[tuple[str, str]]:
    """The folder's net changes in (since, upto], oldest first: each id once, as its
    last event left it. An initial round lists what is there, without removals."""
    last: dict[str, tuple[int, str]] = {}
    for seq, message_id, kind in folder.log:
        if since < seq <= upto:
            last[message_id] = (seq, kind)
    ordered = sorted(last.items(), key=lambda item: item[1][0])
    return [(mid, kind) for mid, (_, kind) in ordered if not (initial and kind == "removed")]


def _denied_directory() -> _Response:
    return _graph_error(
        403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation."
    )


def _preferences(headers: Sequence[str]) -> dict[str, str]:
    prefs: dict[str, str] = {}
    for part in ",".join(headers).split(","):
        name, _, value = part.strip().partition("=")
        if name:
            prefs[name.strip().casefold()] = value.strip().strip('"')
    return prefs


def encode_query(params: dict[str, str]) -> str:
    """A query string as the fake writes its links (`$` and `,` unescaped, as Graph)."""
    return urlencode(params, quote_via=quote, safe="$,")


def _secret() -> str:
    # Shaped like an Entra ID secret value, with characters that need form-encoding.
    return secrets.token_urlsafe(6) + "8Q~" + secrets.token_urlsafe(24) + "+/="


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, fake: FakeGraph, tls: ssl.SSLContext) -> None:
        super().__init__((HOST, 0), _Handler)
        self.fake = fake
        self.tls = tls

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        # The handshake runs in the request's thread, not in the accept loop.
        return self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that rejects the certificate or hangs up is not the fake's failure."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30
    server: _Server

    def setup(self) -> None:
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's
        # algorithm and the client's delayed ACK add 40 ms to every response.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request.settimeout(self.timeout)
        self.request.do_handshake()
        super().setup()

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        response = self.server.fake.handle(self, method, body)
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        with contextlib.suppress(OSError):
            view = memoryview(response.body)
            for start in range(0, len(view), WRITE_CHUNK):
                self.wfile.write(view[start : start + WRITE_CHUNK])

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read `FakeGraph.requests` instead."""
