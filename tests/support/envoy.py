"""Envoy in front of a test's gRPC server, from the same template `make run` uses.

Usage::

    def test_rest(envoy_factory, grpc_server):
        base_url = envoy_factory(grpc_server.port)      # "http://127.0.0.1:PORT"
        requests.get(f"{base_url}/v1/ingestion-sources", ...)

or, outside pytest, ``with running_envoy(grpc_port, workdir) as envoy: envoy.base_url``.

Start-up waits only until Envoy's listener accepts connections, not for
`/healthz`: some tests start Envoy before (or without) a healthy server. Wait
for that yourself with `wait_healthy(base_url)` when a test needs it.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ingestion_grpc.envoy_config import envoy_command, render_envoy_config

__all__ = [
    "EnvoyProxy",
    "envoy_factory",
    "free_port",
    "running_envoy",
    "start_envoy",
    "wait_healthy",
]

HOST = "127.0.0.1"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
START_ATTEMPTS = 3
# Straight to Envoy, whatever http_proxy says.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port that was free a moment ago (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_healthy(base_url: str, timeout: float = 30.0) -> None:
    """Wait until `/healthz` answers 200: Envoy sees the gRPC server SERVING."""
    deadline = time.monotonic() + timeout
    while True:
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            _DIRECT.open(f"{base_url}/healthz", timeout=2) as response,
        ):
            if response.status == 200:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url}/healthz not 200 after {timeout}s")
        time.sleep(0.2)


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
        return True
    return False


@dataclass
class EnvoyProxy:
    """A running Envoy; `base_url` serves REST and native gRPC."""

    port: int
    grpc_port: int
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def grpc_target(self) -> str:
        """For `grpc.insecure_channel`: native gRPC through Envoy."""
        return f"{HOST}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_healthy(self, timeout: float = 30.0) -> None:
        wait_healthy(self.base_url, timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _start_once(grpc_port: int, workdir: Path, metrics_port: int) -> EnvoyProxy | None:
    """One attempt; None if the chosen port was taken before Envoy could bind it."""
    port = free_port()
    config = render_envoy_config(
        HOST, port, grpc_port, 0, workdir / f"envoy-{port}.yaml", metrics_port=metrics_port
    )
    log_path = workdir / f"envoy-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            envoy_command(config),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    proxy = EnvoyProxy(port, grpc_port, config, log_path, process)
    deadline = time.monotonic() + START_TIMEOUT
    while not _accepts(port):
        if process.poll() is not None:
            if "Address already in use" in proxy.log():
                return None
            raise RuntimeError(f"envoy exited with {process.returncode}:\n{proxy.log()}")
        if time.monotonic() > deadline:
            proxy.stop()
            raise TimeoutError(
                f"envoy not listening on {port} after {START_TIMEOUT}s:\n{proxy.log()}"
            )
        time.sleep(0.05)
    return proxy


def start_envoy(grpc_port: int, workdir: Path, metrics_port: int = 0) -> EnvoyProxy:
    """Start Envoy on a free port in front of 127.0.0.1:`grpc_port`; call `stop()` after.

    `metrics_port`: the server's metrics listener, served as `GET /metrics` (0: none)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for _ in range(START_ATTEMPTS):
        proxy = _start_once(grpc_port, workdir, metrics_port)
        if proxy is not None:
            return proxy
    raise RuntimeError(f"envoy found no free port in {START_ATTEMPTS} attempts")


@contextlib.contextmanager
def running_envoy(grpc_port: int, workdir: Path, metrics_port: int = 0) -> Iterator[EnvoyProxy]:
    proxy = start_envoy(grpc_port, workdir, metrics_port)
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="session")
def envoy_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., str]]:
    """`envoy_factory(grpc_port, metrics_port=0) -> base URL`; one Envoy per gRPC port,
    stopped at the end."""
    proxies: dict[int, EnvoyProxy] = {}

    def factory(grpc_port: int, metrics_port: int = 0) -> str:
        proxy = proxies.get(grpc_port)
        if proxy is None or proxy.process.poll() is not None:
            proxy = start_envoy(grpc_port, tmp_path_factory.mktemp("envoy"), metrics_port)
            proxies[grpc_port] = proxy
        return proxy.base_url

    yield factory
    for proxy in proxies.values():
        proxy.stop()
