"""Servers a fault test owns, so that it may stop, kill or restart them: never the
machine's own PostgreSQL or Redis.

- `Postgres`: Debian's PostgreSQL binaries on a free port, data in a temporary
  directory (as root, run as the `postgres` user: PostgreSQL refuses root);
- `RedisServer`: `redis-server` without persistence, so a restart loses everything;
- `FlakyProxy`: a TCP proxy in front of a server (Dovecot) that can be slowed down
  (so that an import lasts long enough for a fault to hit it) and made to reset
  every connection for a while;
- `ServiceProcess`: one of our own processes (the gRPC server, the scheduler) as a
  subprocess with its own environment and log.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tests.support.envoy import free_port

HOST = "127.0.0.1"
START_TIMEOUT = 30.0


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
        return True
    return False


def wait_listening(port: int, what: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not _accepts(port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not listening on {port} after {timeout}s")
        time.sleep(0.05)


def _postgres_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (apt-get install postgresql)")
    return found[-1]


class Postgres:
    """A PostgreSQL cluster of the test's own; `restart()` is a real server restart."""

    def __init__(self) -> None:
        # Not under pytest's tmp_path: that is 0700 root's, closed to `postgres`.
        self.directory = Path(tempfile.mkdtemp(prefix="faults-postgres-"))
        self.data = self.directory / "pgdata"
        self.log_path = self.directory / "postgres.log"
        self.port = free_port()
        # PostgreSQL will not run as root: then its files belong to `postgres`.
        self._as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/postgres"

    def _run(self, *command: str) -> None:
        subprocess.run([*self._as_user, *command], check=True, capture_output=True)

    def start(self) -> Postgres:
        if self._as_user:
            entry = pwd.getpwnam("postgres")
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        if not self.data.exists():
            self._run(_postgres_bin("initdb"), "-D", str(self.data), "-U", "postgres",
                      "--auth=trust", "--no-sync")  # fmt: skip
        self._pg_ctl("start", "-l", str(self.log_path), "-o",
                     f"-p {self.port} -k {self.directory} -c listen_addresses={HOST} "
                     "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")  # fmt: skip
        return self

    def _pg_ctl(self, action: str, *args: str) -> None:
        self._run(_postgres_bin("pg_ctl"), action, "-D", str(self.data), "-w", "-t", "60", *args)

    def stop(self, mode: str = "fast") -> None:
        """`fast` rolls back open transactions and closes every connection;
        `immediate` is a crash (recovery at the next start)."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self._pg_ctl("stop", "-m", mode)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def remove(self) -> None:
        """Stop it at once and delete its files."""
        self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# A restart starts empty, as a Redis without persistence does.
NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


class RedisServer:
    """`redis-server` without persistence on a port of its own."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.log_path = directory / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> RedisServer:
        redis = shutil.which("redis-server")
        if redis is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [redis, "--port", str(self.port), "--bind", HOST, *NO_PERSISTENCE],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_listening(self.port, "redis-server")
        return self

    def kill(self) -> None:
        """SIGKILL: whatever it held is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class FlakyProxy:
    """Forwards 127.0.0.1:`port` to `target_port`, at most `bytes_per_second` each way
    per connection (0: no limit). `drop()` resets every connection, and every new
    one until `restore()`, as a server or network that fails would."""

    CHUNK = 16 * 1024

    def __init__(self, target_port: int, bytes_per_second: int = 0) -> None:
        self.target_port = target_port
        self.bytes_per_second = bytes_per_second
        self._listener = socket.create_server((HOST, 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._dropping = False
        self.resets = 0
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def drop(self) -> None:
        with self._lock:
            self._dropping = True
            doomed, self._sockets = self._sockets, set()
        for sock in doomed:
            # SO_LINGER 0 makes the close an RST, as from a peer that died; the
            # shutdown wakes the thread reading it, which then closes it.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORT)
                sock.shutdown(socket.SHUT_RD)
        self.resets += len(doomed) // 2

    def restore(self) -> None:
        with self._lock:
            self._dropping = False

    def close(self) -> None:
        self.drop()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                dropping = self._dropping
            upstream = None
            if not dropping:
                with contextlib.suppress(OSError):
                    upstream = socket.create_connection((HOST, self.target_port), timeout=5)
            if upstream is None:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORT)
                client.close()
                self.resets += 1
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(source, sink), daemon=True, name="proxy-pump"
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        started = time.monotonic()
        sent = 0
        try:
            while data := source.recv(self.CHUNK):
                sink.sendall(data)
                sent += len(data)
                if self.bytes_per_second:
                    ahead = sent / self.bytes_per_second - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass
        finally:
            with self._lock:
                dropped = source not in self._sockets
                self._sockets -= {source, sink}
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    if not dropped:  # an orderly end: pass the FIN on
                        sock.shutdown(socket.SHUT_RDWR)
                    sock.close()


_ABORT = struct.pack("ii", 1, 0)


class ServiceProcess:
    """One of our processes (`ingestion-grpc server`, `... scheduler`) with its own
    environment, in its own process group, its output in `log_path`."""

    def __init__(self, args: Sequence[str], environment: dict[str, str], log_path: Path) -> None:
        self.args = [sys.executable, "-m", "ingestion_grpc.cli", *args]
        self.environment = {**os.environ, **environment, "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.args,
                env=self.environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
