"""Access to Microsoft Graph for the `microsoft_365` provider: one msal application
and one pooled HTTP session per source per process, and app-only access tokens.

Tokens: msal's client-credentials flow against `{MICROSOFT_AUTHORITY_HOST}/{tenantId}`
for the scope `{MICROSOFT_GRAPH_ENDPOINT}/.default`. Instance discovery (a call to
Microsoft's public cloud) is off for a host that is not one of Microsoft's clouds:
a proxy or a test fake would otherwise be refused, offline. The application is kept
per process, keyed by authority, client id and a hash of the secret, so msal's token
cache is reused and a source updated with a new secret gets a new application.

Trust: REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE when set (requests applies them to every
request), otherwise SSL_CERT_FILE / SSL_CERT_DIR, otherwise the system's trust store
(OpenSSL's default paths), and certifi's bundle only when the system has none.

Secrets: the client secret and the access tokens go only into msal and the
Authorization header. No log line or error message written here holds either, and
errors from the HTTP stack are reduced to their class name (their text holds URLs).
"""

from __future__ import annotations

import hashlib
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msal
import requests
from requests.adapters import HTTPAdapter

from ingestion_grpc.errors import (
    ConnectionCheckFailed,
    ProviderAuthError,
    ProviderError,
    ProviderUnavailable,
)
from ingestion_grpc.providers.base import JsonDict
from ingestion_grpc.providers.retries import RetryLater, is_loopback_host, with_retries

T = TypeVar("T")

# (connect, read) seconds; `read` bounds each wait for bytes, not a whole download.
TIMEOUTS = (10.0, 60.0)
TOKEN_ATTEMPTS = 4
# Connections kept per host: 4 per mailbox for the mailboxes a process runs at once.
POOL_CONNECTIONS = 64
# Sources whose msal application (and its token cache) this process keeps.
MAX_APPS = 256

# Hosts of Microsoft's own clouds, where msal's instance discovery works as designed.
MICROSOFT_AUTHORITY_HOSTS: frozenset[str] = frozenset(
    getattr(msal.authority, "WELL_KNOWN_AUTHORITY_HOSTS", ())
) | {
    "login.microsoftonline.com",
    "login.microsoftonline.us",
    "login.chinacloudapi.cn",
    "login.partner.microsoftonline.cn",
}


# What retry waits and throttling pauses sleep with (the tests make it quick).
SLEEP: Callable[[float], None] = time.sleep


def nap(seconds: float) -> None:
    SLEEP(seconds)


@dataclass(frozen=True)
class Credentials:
    authority_host: str
    graph_endpoint: str
    tenant_id: str
    client_id: str
    client_secret: str = field(repr=False)

    @property
    def authority(self) -> str:
        return f"{self.authority_host.rstrip('/')}/{self.tenant_id}"

    @property
    def graph(self) -> str:
        return self.graph_endpoint.rstrip("/")

    @property
    def scope(self) -> str:
        return f"{self.graph}/.default"


def trust_store() -> str | bool:
    """What verifies certificates when REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE are unset."""
    paths = ssl.get_default_verify_paths()  # honours SSL_CERT_FILE / SSL_CERT_DIR
    return paths.cafile or paths.capath or True


def new_http_session() -> requests.Session:
    session = requests.Session()
    # No retries inside urllib3: `with_retries` decides, within the mailbox's limits.
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=POOL_CONNECTIONS, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.verify = trust_store()
    session.headers["User-Agent"] = "ingestion-grpc microsoft_365"
    return session


class _MsalHttp:
    """msal's HTTP client: the source's session, with the timeouts msal does not set."""

    def __init__(self, session: requests.Session) -> None:
        self._session = session

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", TIMEOUTS)
        return self._session.post(url, **kwargs)

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", TIMEOUTS)
        return self._session.get(url, **kwargs)

    def close(self) -> None:
        """The session is shared by the source's Graph calls: it stays open."""


class GraphApp:
    """One source's msal application, token and HTTP session in this process."""

    def __init__(self, credentials: Credentials) -> None:
        _require_safe_endpoint(credentials.graph, "MICROSOFT_GRAPH_ENDPOINT")
        self.credentials = credentials
        self.http = new_http_session()
        self._lock = threading.Lock()
        self._msal: Any = None
        self._token: str | None = None
        self._fresh_until = 0.0

    def token(self) -> str:
        """A valid access token (msal's cache, or a new one from the identity platform)."""
        with self._lock:
            if self._token is not None and time.monotonic() < self._fresh_until:
                return self._token
            result = exhausted_as_unavailable(
                lambda: with_retries(self._acquire, attempts=TOKEN_ATTEMPTS, sleep=nap),
                f"getting an access token from {self.credentials.authority_host}",
            )
            self._token = str(result["access_token"])
            # msal treats a token as expired 5 minutes early; ask it again before that.
            expires_in = float(result.get("expires_in") or 0)
            self._fresh_until = time.monotonic() + max(0.0, expires_in - 360.0)
            return self._token

    def drop(self, token: str) -> None:
        """Forget `token` (Graph refused it) so the next `token()` gets a new one."""
        with self._lock:
            if self._token != token:
                return  # another thread has already replaced it
            self._token = None
            if self._msal is not None:
                self._msal.remove_tokens_for_client()

    def _application(self) -> Any:
        if self._msal is None:
            c = self.credentials
            host = (urlsplit(c.authority).hostname or "").lower()
            try:
                self._msal = msal.ConfidentialClientApplication(
                    c.client_id,
                    client_credential=c.client_secret,
                    authority=c.authority,
                    http_client=_MsalHttp(self.http),
                    instance_discovery=None if host in MICROSOFT_AUTHORITY_HOSTS else False,
                )
            except ValueError as exc:
                raise _authority_refused(c, str(exc)) from None
            except requests.exceptions.SSLError:
                raise tls_failed(c.authority_host) from None
            except (requests.RequestException, msal.exceptions.MsalServiceError) as exc:
                raise RetryLater(f"identity platform unreachable ({type(exc).__name__})") from None
        return self._msal

    def _acquire(self) -> JsonDict:
        app = self._application()
        try:
            result = app.acquire_token_for_client(scopes=[self.credentials.scope])
        except requests.exceptions.SSLError:
            raise tls_failed(self.credentials.authority_host) from None
        except (requests.RequestException, msal.exceptions.MsalServiceError) as exc:
            raise RetryLater(f"token request failed ({type(exc).__name__})") from None
        if not isinstance(result, dict):
            raise RetryLater("token endpoint answered without a JSON object")
        if result.get("access_token"):
            return result
        error = str(result.get("error") or "")
        if error in ("temporarily_unavailable", "server_error"):
            raise RetryLater(f"token endpoint: {error}")
        raise token_refused(self.credentials, error, result.get("error_codes"))


_APPS: OrderedDict[tuple[str, str, str, str], GraphApp] = OrderedDict()
_APPS_LOCK = threading.Lock()


def graph_app(credentials: Credentials) -> GraphApp:
    """The process's GraphApp for these credentials, so msal's token cache is reused.

    Keyed by a hash of the secret: a source updated with a new secret gets a new one.
    """
    secret_hash = hashlib.sha256(credentials.client_secret.encode("utf-8")).hexdigest()
    key = (credentials.authority, credentials.client_id, secret_hash, credentials.graph)
    with _APPS_LOCK:
        app = _APPS.get(key)
        if app is None:
            app = _APPS[key] = GraphApp(credentials)
            while len(_APPS) > MAX_APPS:
                _APPS.popitem(last=False)
        _APPS.move_to_end(key)
        return app


def exhausted_as_unavailable(call: Callable[[], T], doing: str) -> T:
    """`call()`, its RetryLater once retries are used up turned into ProviderUnavailable."""
    try:
        return call()
    except RetryLater as exc:
        raise ProviderUnavailable(f"{doing} kept failing: {exc.reason}") from None


def token_refused(credentials: Credentials, error: str, codes: Any) -> ProviderAuthError:
    """The identity platform's refusal as an admin can act on it; never quotes the secret."""
    numbers = {int(c) for c in codes if isinstance(c, int)} if isinstance(codes, list) else set()
    aadsts = ", ".join(f"AADSTS{n}" for n in sorted(numbers)) or error or "no error code"
    tenant, client = credentials.tenant_id, credentials.client_id
    if numbers & {90002, 900023} or error == "invalid_tenant":
        return ProviderAuthError(
            f"authentication failed: the tenant {tenant!r} is unknown to "
            f"{credentials.authority_host} ({aadsts}): set tenantId to the directory "
            "(tenant) id or one of the tenant's domain names"
        )
    if 700016 in numbers or error == "unauthorized_client":
        return ProviderAuthError(
            f"authentication failed: the application (client) id {client!r} is unknown in "
            f"tenant {tenant!r} ({aadsts}): check clientId, and that the app is registered "
            "in that tenant or an administrator has consented to it there"
        )
    if numbers & {7000215, 7000222} or error == "invalid_client":
        return ProviderAuthError(
            f"authentication failed: the client secret is invalid or has expired ({aadsts}): "
            f"create a new client secret for the app registration {client!r} and update the "
            "source with its value (not its secret id)"
        )
    if numbers & {500011, 70011, 1002012} or error in ("invalid_scope", "invalid_resource"):
        return ProviderAuthError(
            f"authentication failed: the identity platform refuses the scope "
            f"{credentials.scope!r} ({aadsts}): MICROSOFT_GRAPH_ENDPOINT must be the Graph "
            "endpoint of the same cloud as MICROSOFT_AUTHORITY_HOST"
        )
    return ProviderAuthError(
        f"authentication failed: the Microsoft identity platform refused to issue a token "
        f"for app {client!r} in tenant {tenant!r} ({aadsts})"
    )


def _authority_refused(credentials: Credentials, detail: str) -> ProviderError:
    if "https url" in detail:
        return ConnectionCheckFailed(
            f"MICROSOFT_AUTHORITY_HOST {credentials.authority_host!r} is not an https URL "
            "(such as https://login.microsoftonline.com)"
        )
    return ProviderAuthError(
        f"the tenant {credentials.tenant_id!r} is unknown to {credentials.authority_host} "
        "(its OpenID configuration was refused): set tenantId to the directory (tenant) "
        "id or one of the tenant's domain names, such as contoso.onmicrosoft.com"
    )


def tls_failed(where: str) -> ProviderUnavailable:
    return ProviderUnavailable(
        f"TLS handshake with {where} failed: certificate verify failed; trust its "
        "certificate authority through the system trust store, SSL_CERT_FILE or "
        "REQUESTS_CA_BUNDLE"
    )


def _require_safe_endpoint(url: str, variable: str) -> None:
    """A bearer token goes over plain http only to this machine."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and is_loopback_host(parts.hostname or ""):
        return
    raise ConnectionCheckFailed(
        f"{variable} must be an https URL (such as https://graph.microsoft.com), not {url!r}"
    )
