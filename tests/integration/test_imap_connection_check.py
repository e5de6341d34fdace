"""The generic_imap connection check against a real Dovecot: what passes, and the exact
message for each kind of failure, never with the password in it."""

from __future__ import annotations

import base64
import logging
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ingestion_grpc.errors import ConnectionCheckFailed, ProviderAuthError
from ingestion_grpc.providers import imap as imap_module
from ingestion_grpc.providers.imap import GenericImap, connect, disconnect
from tests.support.dovecot import Dovecot, free_port
from tests.support.fetch_context import NO_ENVIRONMENT

PASSWORD = "correct-Horse-battery-staple-42"


def check(config: dict[str, Any]) -> None:
    GenericImap(GenericImap.validate_config(config), NO_ENVIRONMENT).check_connection()


def failure(config: dict[str, Any], **connect_options: Any) -> ConnectionCheckFailed:
    with pytest.raises(ConnectionCheckFailed) as caught:
        if connect_options:
            disconnect(connect(GenericImap.validate_config(config), **connect_options))
        else:
            check(config)
    assert PASSWORD not in str(caught.value)
    return caught.value


@pytest.fixture
def user(dovecot: Dovecot) -> str:
    return dovecot.new_user("check", PASSWORD)


@pytest.fixture
def trust_test_cert(dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the Dovecot certificate the only trusted one (OpenSSL reads SSL_CERT_FILE)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(dovecot.cert_path))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


@pytest.fixture(scope="module")
def plain_dovecot() -> Iterator[Dovecot]:
    """A server without TLS at all, so without STARTTLS."""
    with Dovecot(tls=False) as server:
        yield server


@pytest.fixture
def without_auth_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the client see no AUTH=PLAIN, as with servers that only know LOGIN.

    (Dovecot itself cannot hide it: its LOGIN command runs through the PLAIN mechanism.)
    """
    real = imap_module._capabilities

    def capabilities(client: Any) -> tuple[bytes, ...]:
        return tuple(c for c in real(client) if not c.upper().startswith(b"AUTH="))

    monkeypatch.setattr(imap_module, "_capabilities", capabilities)


def is_tls(config: dict[str, Any]) -> bool:
    client = connect(GenericImap.validate_config(config))
    try:
        return isinstance(client.socket(), ssl.SSLSocket)
    finally:
        disconnect(client)


# --- what passes -----------------------------------------------------------------------


def test_implicit_tls_passes_when_insecure_certs_are_allowed(dovecot: Dovecot, user: str) -> None:
    config = dovecot.provider_config(user, secure=True, allow_insecure_cert=True)
    check(config)
    assert is_tls(config)


def test_plain_port_upgrades_with_starttls_when_insecure_certs_are_allowed(
    dovecot: Dovecot, user: str
) -> None:
    config = dovecot.provider_config(user, secure=False, allow_insecure_cert=True)
    check(config)
    assert is_tls(config), "Dovecot offers STARTTLS, so the login must not go in plain text"


@pytest.mark.usefixtures("trust_test_cert")
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest.mark.parametrize("secure", [True, False], ids=["implicit-tls", "starttls"])
def test_a_trusted_certificate_verifies(
    dovecot: Dovecot, user: str, host: str, secure: bool
) -> None:
    check({**dovecot.provider_config(user, secure=secure), "host": host})


def test_a_server_without_tls_gets_a_plain_login(plain_dovecot: Dovecot) -> None:
    config = plain_dovecot.provider_config(plain_dovecot.new_user("plain", PASSWORD))
    check(config)
    assert not is_tls(config)


@pytest.mark.usefixtures("without_auth_plain")
def test_without_auth_plain_the_login_command_is_used(plain_dovecot: Dovecot) -> None:
    user = plain_dovecot.new_user("login", PASSWORD)
    check(plain_dovecot.provider_config(user))
    with pytest.raises(ProviderAuthError) as caught:
        check({**plain_dovecot.provider_config(user), "password": "wrong-Password-7"})
    assert str(caught.value) == (
        f"authentication failed: 127.0.0.1:{plain_dovecot.port} rejected the username or "
        f"password for {user} (server said: [AUTHENTICATIONFAILED] Authentication failed.)"
    )


@pytest.mark.usefixtures("without_auth_plain")
def test_without_auth_plain_a_non_ascii_password_cannot_be_sent(plain_dovecot: Dovecot) -> None:
    user = plain_dovecot.new_user("login", "pässwörd")
    error = failure(plain_dovecot.provider_config(user))
    assert not isinstance(error, ProviderAuthError)
    assert str(error) == (
        f"127.0.0.1:{plain_dovecot.port} supports only the LOGIN command, which cannot send "
        "a username or password with non-ASCII characters"
    )


def test_a_server_that_disables_login_without_tls_says_so() -> None:
    # Without TLS and without the PLAIN mechanism Dovecot advertises LOGINDISABLED.
    with Dovecot(tls=False, auth_mechanisms="login") as server:
        error = failure(server.provider_config(server.new_user("x", PASSWORD)))
    assert not isinstance(error, ProviderAuthError)
    assert str(error) == (
        f"127.0.0.1:{server.port} refuses to log in without TLS and does not offer STARTTLS: "
        "set secure to true and use its TLS port (usually 993)"
    )


def test_a_non_ascii_password_logs_in(dovecot: Dovecot) -> None:
    password = 'pässwörd:"quoted" \\ 密码'
    email = dovecot.new_user("utf8", password)
    check(dovecot.provider_config(email, secure=True, allow_insecure_cert=True))


def test_the_check_logs_out(dovecot: Dovecot, user: str) -> None:
    check(dovecot.provider_config(user, secure=True, allow_insecure_cert=True))
    deadline = time.monotonic() + 5
    while f"imap({user})" not in dovecot.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in dovecot.log().splitlines() if f"imap({user})" in line]
    assert lines and "Disconnected: Logged out" in lines[-1], lines


# --- what fails, and how it says so ----------------------------------------------------


@pytest.mark.parametrize("secure", [True, False], ids=["implicit-tls", "starttls"])
def test_an_untrusted_certificate_fails_the_tls_handshake(
    dovecot: Dovecot, user: str, secure: bool
) -> None:
    error = failure(dovecot.provider_config(user, secure=secure, allow_insecure_cert=False))
    assert not isinstance(error, ProviderAuthError)
    port = dovecot.tls_port if secure else dovecot.port
    assert str(error) == (
        f"TLS handshake failed: certificate verify failed: self-signed certificate "
        f"(127.0.0.1:{port}); install a certificate from a trusted authority, "
        "or set allowInsecureCert to true to accept this one"
    )


def test_a_wrong_password_is_an_auth_error(
    dovecot: Dovecot, user: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-Password-7"
    config = {**dovecot.provider_config(user, secure=True, allow_insecure_cert=True)}
    config["password"] = wrong
    with pytest.raises(ProviderAuthError) as caught:
        check(config)
    message = str(caught.value)
    assert message == (
        f"authentication failed: 127.0.0.1:{dovecot.tls_port} rejected the username or "
        f"password for {user} (server said: [AUTHENTICATIONFAILED] Authentication failed.)"
    )
    # Neither the message nor any log line (imapclient logs the protocol at DEBUG)
    # holds the password, nor the base64 AUTHENTICATE PLAIN carries.
    sasl = base64.b64encode(f"\0{user}\0{wrong}".encode()).decode()
    assert "AUTHENTICATE" in caplog.text, "the protocol log was not captured"
    for text in (message, repr(caught.value.args), caplog.text):
        assert wrong not in text
        assert PASSWORD not in text
        assert sasl not in text


def test_an_unknown_user_is_an_auth_error(dovecot: Dovecot) -> None:
    config = {**dovecot.provider_config(dovecot.new_user("x", PASSWORD), secure=True)}
    config.update(allowInsecureCert=True, username="nobody-here@example.com")
    with pytest.raises(ProviderAuthError, match=r"^authentication failed: "):
        check(config)


def test_a_changed_password_stops_working(dovecot: Dovecot, user: str) -> None:
    config = dovecot.provider_config(user, secure=True, allow_insecure_cert=True)
    check(config)
    dovecot.set_password(user, "rotated-password")
    with pytest.raises(ProviderAuthError):
        check(config)


def test_nothing_listening_is_connection_refused(dovecot: Dovecot, user: str) -> None:
    port = free_port()
    error = failure({**dovecot.provider_config(user), "port": port})
    assert str(error) == (
        f"connection refused by 127.0.0.1:{port}: nothing accepts connections on that port"
    )


def test_an_unresolvable_host_is_a_dns_error(dovecot: Dovecot, user: str) -> None:
    error = failure({**dovecot.provider_config(user), "host": "imap.no-such-host.invalid"})
    assert str(error).startswith("could not resolve host imap.no-such-host.invalid: ")


def test_a_silent_server_times_out(dovecot: Dovecot, user: str) -> None:
    with socket.socket() as silent:  # accepts TCP connections (backlog), never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        error = failure({**dovecot.provider_config(user), "port": port}, timeout=0.5)
    assert str(error) == f"timed out connecting to 127.0.0.1:{port} (no answer within 0.5 s)"


def test_implicit_tls_on_a_plain_port_says_so(dovecot: Dovecot, user: str) -> None:
    config = {**dovecot.provider_config(user, allow_insecure_cert=True), "secure": True}
    error = failure(config)
    assert str(error) == (
        f"TLS handshake failed with 127.0.0.1:{dovecot.port}: WRONG_VERSION_NUMBER "
        "(the server did not answer in TLS: for a plain or STARTTLS port, usually 143, "
        "set secure to false)"
    )


# --- the Dovecot helper itself ---------------------------------------------------------


def test_the_helper_seeds_and_inspects_mail(dovecot: Dovecot, user: str) -> None:
    messages = [
        b"Subject: m%d\r\nMessage-ID: <%d@test>\r\n\r\nbody\r\n" % (i, i) for i in range(50)
    ]
    assert dovecot.append(user, "Archive/2024", messages) == list(range(1, 51))
    status = dovecot.status(user, "Archive/2024")
    assert (status["messages"], status["uidnext"]) == (50, 51)
    dovecot.set_uidvalidity(user, "Archive/2024", 4242)
    assert dovecot.status(user, "Archive/2024")["uidvalidity"] == 4242
    dovecot.create_folder(user, "Empty")
    dovecot.create_folder(user, "Empty")  # no error when it exists
    assert dovecot.status(user, "Empty")["messages"] == 0
