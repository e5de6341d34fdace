"""A real Dovecot IMAP server for tests, started in a temporary directory.

Usage::

    with Dovecot() as server:          # or Dovecot(tls=False) for a server without TLS
        server.add_user("alice@example.com", "secret")
        server.append("alice@example.com", "INBOX", [raw1, raw2])
        server.status("alice@example.com", "INBOX")   # {'messages': 2, 'uidvalidity': ...}

The server listens on 127.0.0.1 only: a plain port (`port`, which offers STARTTLS
when `tls` is on) and an implicit-TLS port (`tls_port`). The certificate is
self-signed for `localhost` and `127.0.0.1`; `cert_path` is the file a test
points `SSL_CERT_FILE` (or an `ssl.SSLContext`) at to trust it.

Dovecot runs in the foreground as our child (`dovecot -F -c CONF`), so a failed
start is seen at once (the child exits) and `stop()` knows exactly which process
to stop and wait for. As root, mail is stored as
`nobody:nogroup` (Dovecot refuses to run mail processes as root); as another
user, everything runs as that user.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime as dt
import getpass
import grp
import ipaddress
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from imapclient import IMAPClient

__all__ = ["Dovecot", "DovecotNotInstalled", "dovecot"]

HOST = "127.0.0.1"
START_TIMEOUT = 15.0
# One MULTIAPPEND command carries at most this many messages / bytes.
APPEND_BATCH_MESSAGES = 500
APPEND_BATCH_BYTES = 16 * 1024 * 1024


class DovecotNotInstalled(RuntimeError):
    """Raised when the `dovecot` or `doveadm` binary cannot be found."""


def find_binary(name: str) -> str:
    """The path of a Dovecot binary; /usr/sbin is often not on a user's PATH."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/usr/local/sbin")
    if found is None:
        raise DovecotNotInstalled(
            f"`{name}` is not installed: the IMAP integration tests need a real Dovecot "
            "(apt-get update && apt-get install -y dovecot-imapd)"
        )
    return found


class Dovecot:
    """One Dovecot instance with its own config, users, mail and TLS certificate."""

    host = HOST

    def __init__(
        self, *, tls: bool = True, auth_mechanisms: str = "plain login", keep_files: bool = False
    ) -> None:
        """`auth_mechanisms` is Dovecot's setting. Its LOGIN command runs through the
        PLAIN mechanism, so without "plain" (and without TLS) it advertises LOGINDISABLED."""
        self.tls = tls
        self.auth_mechanisms = auth_mechanisms
        self.keep_files = keep_files
        self._dovecot = find_binary("dovecot")
        self._doveadm = find_binary("doveadm")
        self._passwords: dict[str, str] = {}
        self._users_mtime = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._port = 0
        self._tls_port = 0
        self.directory = Path(tempfile.mkdtemp(prefix="dovecot-test-"))
        # mkdtemp makes 0700; Dovecot's unprivileged processes must traverse it.
        self.directory.chmod(0o755)
        self.conf_path = self.directory / "dovecot.conf"
        self.users_dir = self.directory / "users"
        self.log_path = self.directory / "dovecot.log"
        self.cert_path = self.directory / "cert.pem"
        self.key_path = self.directory / "key.pem"
        self.mail_dir = self.directory / "mail"

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> Dovecot:
        """Write the files, start Dovecot and wait until it accepts connections."""
        try:
            self._prepare_files()
            for attempt in range(3):
                self._port = free_port()
                self._tls_port = free_port() if self.tls else 0
                self._write_config()
                if self._spawn():
                    return self
                if "Address already in use" not in self.log() or attempt == 2:
                    break  # a real failure, not a port race
            raise RuntimeError(f"dovecot did not start; its log:\n{self.log()}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop Dovecot and remove its files.

        This sends SIGTERM to the master, as `doveadm stop` does, and reaps it. (Run
        against our own foreground child, `doveadm stop` itself waits 3 s: it polls
        until the pid is gone, and an exited child stays a zombie until we reap it.)
        """
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if not self.keep_files:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def port(self) -> int:
        """The plain IMAP port (it offers STARTTLS when `tls` is on)."""
        return self._port

    @property
    def tls_port(self) -> int:
        """The implicit-TLS (IMAPS) port."""
        if not self.tls:
            raise RuntimeError("this Dovecot was started with tls=False: it has no TLS port")
        return self._tls_port

    def log(self) -> str:
        """Dovecot's own log (useful in assertion messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- users ---------------------------------------------------------------

    def add_user(self, email: str, password: str) -> None:
        """Add a login; the very next IMAP login can use it."""
        if email in self._passwords:
            raise ValueError(f"user {email} already exists")
        self._write_user(email, password)

    def new_user(self, prefix: str = "user", password: str | None = None) -> str:
        """Add a user with a unique address (and a random password unless given)."""
        email = f"{prefix}-{secrets.token_hex(4)}@example.com"
        self.add_user(email, password if password is not None else secrets.token_urlsafe(12))
        return email

    def set_password(self, email: str, password: str) -> None:
        """Change a password; returns once Dovecot is sure to use the new one.

        Dovecot's passwd-file looks at a file at most once a second, so a change in
        the second of the last lookup would go unseen: wait for the next second.
        """
        if email not in self._passwords:
            raise KeyError(email)
        self._write_user(email, password)
        time.sleep(1.05 - time.time() % 1)

    def password(self, email: str) -> str:
        return self._passwords[email]

    def provider_config(
        self, email: str, *, secure: bool = False, allow_insecure_cert: bool = False
    ) -> dict[str, Any]:
        """A `generic_imap` providerConfig that logs in as `email` on this server."""
        return {
            "host": self.host,
            "port": self.tls_port if secure else self.port,
            "secure": secure,
            "allowInsecureCert": allow_insecure_cert,
            "username": email,
            "password": self._passwords[email],
        }

    # -- mail ------------------------------------------------------------------

    @contextlib.contextmanager
    def client(self, email: str) -> Iterator[IMAPClient]:
        """An IMAPClient logged in as `email` on the plain port; logs out on exit."""
        imap = IMAPClient(self.host, self.port, ssl=False, timeout=30)
        try:
            # AUTHENTICATE PLAIN carries any password (LOGIN cannot send non-ASCII).
            if imap.has_capability("AUTH=PLAIN"):
                imap.plain_login(email, self._passwords[email])
            else:
                imap.login(email, self._passwords[email])
            yield imap
        finally:
            with contextlib.suppress(Exception):
                imap.logout()

    def create_folder(self, email: str, folder: str) -> None:
        """Create `folder` (and its parents) for `email`; no error if it exists."""
        with self.client(email) as imap:
            _ensure_folder(imap, folder)

    def append(
        self,
        email: str,
        folder: str,
        messages: bytes | Iterable[bytes],
        *,
        flags: Iterable[str] = (),
        internal_date: dt.datetime | None = None,
    ) -> list[int]:
        """Store raw messages in `folder` (created if missing); return their UIDs.

        One IMAP connection and MULTIAPPEND batches (with LITERAL+), so thousands of
        messages take seconds, not minutes.
        """
        batch_flags = tuple(flags)
        items = [messages] if isinstance(messages, bytes) else messages
        uids: list[int] = []
        with self.client(email) as imap:
            _ensure_folder(imap, folder)
            batch: list[dict[str, Any]] = []
            size = 0
            for raw in items:
                item: dict[str, Any] = {"msg": raw, "flags": batch_flags}
                if internal_date is not None:
                    item["date"] = internal_date
                batch.append(item)
                size += len(raw)
                if len(batch) >= APPEND_BATCH_MESSAGES or size >= APPEND_BATCH_BYTES:
                    uids += _multiappend(imap, folder, batch)
                    batch, size = [], 0
            if batch:
                uids += _multiappend(imap, folder, batch)
        return uids

    def fill_inbox(self, email: str, messages: Iterable[bytes]) -> int:
        """Write raw messages straight into the user's Maildir INBOX (new, empty);
        how many. Tens of thousands take seconds, where APPEND takes a minute;
        Dovecot indexes them at the next login or status."""
        maildir = self.mail_dir / email / "Maildir"
        owner = _mail_owner()
        for path in (maildir.parent, maildir, maildir / "cur", maildir / "new", maildir / "tmp"):
            path.mkdir()
            os.chown(path, *owner)
        stamp = int(time.time())
        count = 0
        for count, raw in enumerate(messages, start=1):
            (maildir / "cur" / f"{stamp}.M{count}P1.filled,S={len(raw)}:2,").write_bytes(raw)
        return count

    def status(self, email: str, folder: str) -> dict[str, int]:
        """`doveadm mailbox status`: messages, unseen, uidvalidity, uidnext, highestmodseq."""
        fields = "messages unseen uidvalidity uidnext highestmodseq"
        out = self.doveadm("-f", "tab", "mailbox", "status", "-u", email, fields, folder)
        lines = out.splitlines()
        if len(lines) < 2:
            raise RuntimeError(f"unexpected doveadm output: {out!r}")
        row = dict(zip(lines[0].split("\t"), lines[1].split("\t"), strict=True))
        return {key: int(value) for key, value in row.items() if key != "mailbox"}

    def set_uidvalidity(self, email: str, folder: str, uidvalidity: int) -> None:
        """Force a new UIDVALIDITY, as a server does after rebuilding a folder."""
        self.doveadm("mailbox", "update", "-u", email, "--uid-validity", str(uidvalidity), folder)

    def doveadm(self, *args: str) -> str:
        """Run `doveadm -c CONF ARGS...`; return stdout or raise with stderr."""
        done = subprocess.run(
            [self._doveadm, "-c", str(self.conf_path), *args],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"doveadm {' '.join(args)} failed ({done.returncode}): "
                f"{done.stderr.decode(errors='replace').strip()}"
            )
        return done.stdout.decode(errors="replace")

    # -- internals -------------------------------------------------------------

    def _prepare_files(self) -> None:
        self.mail_dir.mkdir()
        for sub in ("run", "state", "users"):
            (self.directory / sub).mkdir()
        if os.geteuid() == 0:
            os.chown(self.mail_dir, pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
        if self.tls:
            write_self_signed_cert(self.cert_path, self.key_path)

    def _write_config(self) -> None:
        d = self.directory
        if os.geteuid() == 0:
            identity = "uid=nobody gid=nogroup"
            run_as = ""
        else:
            user = getpass.getuser()
            identity = f"uid={os.getuid()} gid={os.getgid()}"
            run_as = f"default_login_user = {user}\ndefault_internal_user = {user}\n"
        if self.tls:
            ssl = f"ssl = yes\nssl_cert = <{self.cert_path}\nssl_key = <{self.key_path}\n"
        else:
            ssl = "ssl = no\n"
        self.conf_path.write_text(
            f"""\
base_dir = {d}/run
state_dir = {d}/state
log_path = {self.log_path}
{run_as}protocols = imap
listen = {HOST}
disable_plaintext_auth = no
auth_mechanisms = {self.auth_mechanisms}
auth_failure_delay = 0
first_valid_uid = 1
mail_location = maildir:{self.mail_dir}/%u/Maildir
mail_fsync = never
mail_max_userip_connections = 200
passdb {{
  driver = passwd-file
  args = username_format=%u {self.users_dir}/%u
}}
userdb {{
  driver = static
  args = {identity} home={self.mail_dir}/%u
}}
{ssl}service imap-login {{
  inet_listener imap {{
    address = {HOST}
    port = {self._port}
  }}
  inet_listener imaps {{
    address = {HOST}
    port = {self._tls_port}
    ssl = yes
  }}
}}
# No per-IP auth penalty: otherwise each login after a failed one (tests fail logins on
# purpose) waits 2 to 15 seconds. Dovecot disables it when this socket is unusable.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
namespace inbox {{
  inbox = yes
  separator = /
}}
"""
        )

    def _spawn(self) -> bool:
        self.log_path.unlink(missing_ok=True)
        with (self.directory / "dovecot.stderr").open("ab") as err:
            self._proc = subprocess.Popen(
                [self._dovecot, "-F", "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                preexec_fn=_die_with_parent,
            )
        ports = [p for p in (self._port, self._tls_port) if p]
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            if all(port_open(self.host, p) for p in ports):
                return True
            time.sleep(0.02)
        raise RuntimeError(f"dovecot did not open {ports} in {START_TIMEOUT} s:\n{self.log()}")

    def _write_user(self, email: str, password: str) -> None:
        # One passwd-file per user (`users/%u`): a new user is a new file, which Dovecot
        # reads on first lookup, while one shared file would be re-read at most once a
        # second. {PLAIN.b64} lets a password hold ':' and any non-ASCII character.
        if not email or any(c in email for c in ":/\n\r\t\0 ") or email.startswith("."):
            raise ValueError(f"not usable as a Dovecot login: {email!r}")
        if any(c in password for c in "\n\r\0"):
            raise ValueError("IMAP cannot carry a password with a line break or NUL")
        self._passwords[email] = password
        encoded = base64.b64encode(password.encode()).decode()
        tmp = self.users_dir / f".{email}.tmp"
        tmp.write_text(f"{email}:{{PLAIN.b64}}{encoded}\n")
        tmp.chmod(0o644)
        # Dovecot re-reads a file when its mtime or size changed: give every write a
        # new mtime, so a same-length password written in the same second is noticed.
        self._users_mtime = max(int(time.time()), self._users_mtime + 1)
        os.utime(tmp, (self._users_mtime, self._users_mtime))
        tmp.replace(self.users_dir / email)


def _mail_owner() -> tuple[int, int]:
    """Who Dovecot's mail processes run as (`_write_config`): nobody, or us."""
    if os.geteuid() == 0:
        return pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    return os.getuid(), os.getgid()


def _die_with_parent() -> None:
    """In the child before exec: on Linux, get SIGTERM when the test process dies,
    so even a killed test run leaves no Dovecot behind. Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _ensure_folder(imap: IMAPClient, folder: str) -> None:
    if folder.upper() == "INBOX" or imap.folder_exists(folder):
        return
    imap.create_folder(folder)


def _multiappend(imap: IMAPClient, folder: str, batch: list[dict[str, Any]]) -> list[int]:
    # multiappend returns imaplib's raw (typ, data) without checking it.
    typ, data = imap.multiappend(folder, batch)
    text = b" ".join(d for d in data if isinstance(d, bytes)).decode(errors="replace")
    if typ != "OK":
        raise RuntimeError(f"APPEND to {folder} failed: {typ} {text}")
    match = re.search(r"APPENDUID \d+ ([\d:,]+)", text)
    return parse_uid_set(match.group(1)) if match else []


def parse_uid_set(text: str) -> list[int]:
    """'3:5,9' -> [3, 4, 5, 9]."""
    uids: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition(":")
        uids.extend(range(int(first), int(last or first) + 1))
    return uids


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def write_self_signed_cert(cert_path: Path, key_path: Path) -> None:
    """A self-signed certificate for `localhost` and `127.0.0.1` (what `openssl req -x509`
    makes), so a client can trust exactly this file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    cert_path.chmod(0o644)


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    """One real Dovecot for the whole run (TLS on); give each test its own users."""
    try:
        server = Dovecot()
    except DovecotNotInstalled as exc:
        missing = str(exc)
    else:
        with server:
            yield server
        return
    pytest.fail(missing, pytrace=False)
