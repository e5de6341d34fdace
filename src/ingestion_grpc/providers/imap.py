"""Generic IMAP: one mailbox on any IMAP4rev1 server, with a username and password.

`connect` opens a logged-in connection and turns every failure into an error that
says what failed, without a credential; the connection check and the mail fetch
both use it. The fetch itself (folders, cursor, batches, reconnects) lives in
`imap_fetch` and `imap_folders`.

TLS: `secure: true` means implicit TLS (usually port 993). With `secure: false`
the client upgrades with STARTTLS whenever the server offers it, and never falls
back to plain text if that upgrade fails; only a server that does not offer
STARTTLS gets a plain-text login. Certificates are verified against the system's
trust store (OpenSSL's default paths, so `SSL_CERT_FILE` / `SSL_CERT_DIR` apply)
unless `allowInsecureCert` is true.
"""

from __future__ import annotations

import contextlib
import imaplib
import ipaddress
import logging
import re
import socket
import ssl
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

from imapclient import IMAPClient
from imapclient.exceptions import LoginError
from imapclient.imapclient import SocketTimeout

from ingestion_grpc.errors import ConnectionCheckFailed, InvalidArgument, ProviderAuthError
from ingestion_grpc.providers.base import (
    HOST_TEXT,
    Batch,
    ConfigField,
    FetchContext,
    JsonDict,
    Mailbox,
    Provider,
    check_patterns,
)
from ingestion_grpc.providers.imap_fetch import fetch_mailbox

logger = logging.getLogger(__name__)

TIMEOUT_SECONDS = 10.0
IMPLICIT_TLS_PORT = 993

# Login refusals that are not about the credentials (RFC 5530 response codes).
NOT_CREDENTIAL_CODES = frozenset({"UNAVAILABLE", "PRIVACYREQUIRED", "SERVERBUG", "LIMIT", "INUSE"})
# Characters no IMAP login command can carry.
UNSENDABLE = frozenset("\r\n\0")
_RESPONSE_CODE = re.compile(r"\[([A-Z-]+)")
# What imaplib / IMAPClient put before the server's text.
_LOGIN_ERROR_PREFIX = re.compile(r"^(?:login failed|LOGIN command error):\s*", re.IGNORECASE)
_BYTES_REPR = re.compile(r"b(['\"])(.*)\1", re.DOTALL)


class GenericImap(Provider):
    """One IMAP account."""

    name = "generic_imap"
    fields = (
        ConfigField("host", str, text=HOST_TEXT),
        ConfigField("port", int),
        # true: implicit TLS from the first byte; false: STARTTLS if offered, else plain.
        ConfigField("secure", bool),
        # Optional, default false: accept a certificate that does not verify.
        ConfigField("allowInsecureCert", bool, required=False),
        ConfigField("username", str),
        ConfigField("password", str, secret=True),
        # Optional glob patterns (fnmatch) on folder paths, such as "Archive/*".
        ConfigField("includeFolders", list, required=False),
        ConfigField("excludeFolders", list, required=False),
    )

    @classmethod
    def check_values(cls, config: JsonDict) -> None:
        if not _valid_host(config["host"]):
            raise InvalidArgument(
                "providerConfig.host",
                "must be a host name or IP address, without scheme, port or path "
                "(such as imap.example.com)",
            )
        if not 1 <= config["port"] <= 65535:
            raise InvalidArgument("providerConfig.port", "must be between 1 and 65535")
        for name in ("username", "password"):
            if UNSENDABLE.intersection(config[name]):
                raise InvalidArgument(
                    f"providerConfig.{name}", "must not contain line breaks or NUL characters"
                )
        config.setdefault("allowInsecureCert", False)
        check_patterns(config, "includeFolders", "excludeFolders")

    def check_connection(self) -> None:
        """Log in for real, then log out; raise ConnectionCheckFailed saying what failed."""
        client = connect(self.config)
        disconnect(client)
        logger.info(
            "IMAP check passed: %s logged in to %s",
            self.config["username"],
            _where(self.config),
        )

    def list_mailboxes(self) -> list[Mailbox]:
        """One IMAP account is one mailbox, named by its username."""
        username = str(self.config["username"])
        return [Mailbox(username, username)]

    def fetch(
        self, mailbox: Mailbox, cursor: JsonDict | None, context: FetchContext
    ) -> Iterator[Batch]:
        """Every selectable folder's messages after `cursor` (see `imap_fetch`).

        Raises ProviderAuthError when the login is refused, ProviderUnavailable when
        the server cannot be reached or keeps dropping the connection.
        """
        if mailbox.id != self.config["username"]:
            raise InvalidArgument(
                "mailbox", f"a {self.name} source has only the mailbox named by its username"
            )
        return fetch_mailbox(
            self.config, cursor, connect=connect, disconnect=disconnect, where=_where(self.config)
        )


def connect(config: Mapping[str, Any], *, timeout: float = TIMEOUT_SECONDS) -> IMAPClient:
    """A logged-in IMAPClient for a validated `generic_imap` config.

    Raises ProviderAuthError when the server refuses the credentials, and
    ConnectionCheckFailed for every other failure (DNS, refused, timeout, TLS,
    protocol). No message contains the password. Close with `disconnect`.
    """
    host = str(config["host"])
    port = int(config["port"])
    secure = bool(config["secure"])
    context = tls_context(allow_insecure=bool(config.get("allowInsecureCert", False)))
    where = _where(config)

    with _failures_explained(config, timeout, "connecting to"):
        client = IMAPClient(
            host,
            port,
            ssl=secure,
            ssl_context=context if secure else None,
            timeout=SocketTimeout(connect=timeout, read=timeout),
        )
    try:
        if not secure:
            if client.has_capability("STARTTLS"):
                with _failures_explained(config, timeout, "starting TLS (STARTTLS) with"):
                    client.starttls(context)
            else:
                logger.warning("%s does not offer STARTTLS: logging in without encryption", where)
        with _failures_explained(config, timeout, "logging in to"):
            _login(client, config)
    except ProviderAuthError:
        disconnect(client)  # the session is sound: say LOGOUT
        raise
    except BaseException:
        # No LOGOUT: after a failed TLS upgrade or a network error the stream is unusable.
        with contextlib.suppress(Exception):
            client.shutdown()
        raise
    return client


def disconnect(client: IMAPClient) -> None:
    """Log out (closing the socket even if LOGOUT fails); never raises."""
    try:
        client.logout()
    except Exception:  # the server may already have gone; the socket still closes
        with contextlib.suppress(Exception):
            client.shutdown()


def tls_context(*, allow_insecure: bool) -> ssl.SSLContext:
    """A client context that verifies the certificate and host name unless told not to."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_default_verify_paths()
    if allow_insecure:
        context.check_hostname = False  # must come before CERT_NONE
        context.verify_mode = ssl.CERT_NONE
    else:
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _login(client: IMAPClient, config: Mapping[str, Any]) -> None:
    username = str(config["username"])
    password = str(config["password"])
    where = _where(config)
    capabilities = {c.upper() for c in _capabilities(client)}
    # AUTHENTICATE PLAIN sends UTF-8 (LOGIN cannot carry non-ASCII) and is what
    # nearly every server offers; LOGIN is the fallback every IMAP4rev1 server has.
    use_plain = b"AUTH=PLAIN" in capabilities
    if not use_plain:
        if b"LOGINDISABLED" in capabilities:
            raise ConnectionCheckFailed(
                f"{where} refuses to log in without TLS and does not offer STARTTLS: "
                f"set secure to true and use its TLS port (usually {IMPLICIT_TLS_PORT})"
            )
        if not (username.isascii() and password.isascii()):
            raise ConnectionCheckFailed(
                f"{where} supports only the LOGIN command, which cannot send a username "
                "or password with non-ASCII characters"
            )
    try:
        if use_plain:
            client.plain_login(username, password)
        else:
            client.login(username, password)
    except LoginError as exc:
        reply = _server_text(str(exc), password)
        if "socket error" in reply or "EOF" in reply:
            raise ConnectionCheckFailed(
                f"{where} closed the connection during login ({reply})"
            ) from None
        code = _RESPONSE_CODE.search(reply)
        if code and code.group(1) in NOT_CREDENTIAL_CODES:
            raise ConnectionCheckFailed(f"{where} refused the login: {reply}") from None
        raise ProviderAuthError(
            f"authentication failed: {where} rejected the username or password "
            f"for {username} (server said: {reply})"
        ) from None


def _capabilities(client: IMAPClient) -> tuple[bytes, ...]:
    return tuple(client.capabilities())


@contextlib.contextmanager
def _failures_explained(config: Mapping[str, Any], timeout: float, doing: str) -> Iterator[None]:
    """Turn network, TLS and protocol errors into ConnectionCheckFailed.

    `doing` names the step ("connecting to", "logging in to", ...). Auth errors
    raised inside pass through unchanged.
    """
    try:
        yield
    except ConnectionCheckFailed:
        raise
    except Exception as exc:
        _explain(exc, config, timeout, doing)


def _explain(exc: Exception, config: Mapping[str, Any], timeout: float, doing: str) -> NoReturn:
    host = str(config["host"])
    port = int(config["port"])
    secure = bool(config["secure"])
    where = _where(config)
    password = str(config.get("password") or "")
    detail = _redact(str(exc), password)
    logger.info("IMAP %s %s failed: %s: %s", doing, where, type(exc).__name__, detail)

    message: str
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason or "untrusted certificate"
        message = (
            f"TLS handshake failed: certificate verify failed: {reason} ({where}); "
            "install a certificate from a trusted authority, or set allowInsecureCert "
            "to true to accept this one"
        )
    elif isinstance(exc, ssl.SSLError):
        reason = exc.reason or exc.strerror or detail
        message = f"TLS handshake failed with {where}: {reason}"
        if secure and reason == "WRONG_VERSION_NUMBER":
            message += (
                " (the server did not answer in TLS: for a plain or STARTTLS port, "
                "usually 143, set secure to false)"
            )
    elif isinstance(exc, socket.gaierror):
        message = f"could not resolve host {host}: {exc.strerror or detail}"
    elif isinstance(exc, ConnectionRefusedError):
        message = f"connection refused by {where}: nothing accepts connections on that port"
    elif isinstance(exc, TimeoutError):
        message = f"timed out {doing} {where} (no answer within {timeout:g} s)"
        if not secure and port == IMPLICIT_TLS_PORT:
            message += f"; port {IMPLICIT_TLS_PORT} usually expects TLS: set secure to true"
    elif isinstance(exc, OSError):
        message = f"network error {doing} {where}: {exc.strerror or detail}"
    elif isinstance(exc, imaplib.IMAP4.error):
        message = f"{where} did not answer like an IMAP server while {doing} it: {detail}"
    else:
        message = f"unexpected error {doing} {where}: {type(exc).__name__}: {detail}"
    raise ConnectionCheckFailed(message) from exc


def _server_text(error: str, password: str) -> str:
    """The server's words from a login error: "login failed: b'[X] y'" -> "[X] y"."""
    text = _LOGIN_ERROR_PREFIX.sub("", error)
    bytes_repr = _BYTES_REPR.fullmatch(text)
    return _redact(bytes_repr.group(2) if bytes_repr else text, password)


def _redact(text: str, password: str) -> str:
    """Server text for a message: the password (should a server echo it) masked, short."""
    if password:
        text = text.replace(password, "***")
    return text[:300]


def _where(config: Mapping[str, Any]) -> str:
    host = str(config["host"])
    return f"[{host}]:{config['port']}" if ":" in host else f"{host}:{config['port']}"


def _valid_host(host: str) -> bool:
    if not host or any(c.isspace() for c in host) or "/" in host or "@" in host:
        return False
    if ":" in host:  # only an IPv6 address may hold a colon
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
    return True
