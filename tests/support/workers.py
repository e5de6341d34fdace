"""Real Dramatiq worker processes for engine tests, and the engine's scheduler
tick run in the test process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ingestion_grpc import bootstrap
from ingestion_grpc.config import Settings
from ingestion_grpc.engine.context import EngineContext
from ingestion_grpc.jobs.worker import worker_command, worker_environment


class Worker:
    """`python -m dramatiq ingestion_grpc.jobs.actors` in its own process group."""

    def __init__(self, environment: dict[str, str], log_path: Path, threads: int = 2) -> None:
        self._environment = worker_environment(
            {**os.environ, **environment, "PYTHONUNBUFFERED": "1"}, threads
        )
        self.log_path = log_path
        self.threads = threads
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                worker_command(threads=self.threads),
                env=self._environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def kill(self) -> None:
        """SIGKILL the whole group: the Dramatiq parent and its worker process."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def worker_starter(environment: dict[str, str], log_dir: Path) -> Iterator[Callable[[], Worker]]:
    """`start()` starts one more worker with `environment`; all are stopped on exit."""
    workers: list[Worker] = []

    def start() -> Worker:
        worker = Worker(environment, log_dir / f"worker-{len(workers)}.log").start()
        workers.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in workers:
            worker.stop()


@pytest.fixture
def start_worker(environment: dict[str, str], tmp_path: Path) -> Iterator[Callable[[], Worker]]:
    """`start_worker()` starts one more worker; all are stopped after the test."""
    with worker_starter(environment, tmp_path) as start:
        yield start


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Iterator[EngineContext]:
    """The engine as the scheduler sees it, for calling `tick` in a test."""
    context = bootstrap.engine_context(settings, bootstrap.job_queue(settings))
    yield context
    context.database.dispose()
