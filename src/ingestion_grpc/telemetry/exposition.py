"""Serving `GET /metrics` from the server process, for every process of the node.

prometheus-client's multiprocess mode: each process writes its values to
memory-mapped files in one directory (PROMETHEUS_MULTIPROC_DIR, by default
DATA_DIR/metrics), and the server's listener (METRICS_PORT, which Envoy serves
as `GET /metrics` on its own port) adds up every file at each scrape. Counters
of a process that exited stay counted, so totals never go backwards while the
stack runs; `ingestion-grpc run` empties the directory when it starts, as
multiprocess mode requires. The queue's depth is read from Redis at scrape time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from ingestion_grpc.telemetry import metrics

log = logging.getLogger(__name__)

# The variable prometheus-client itself reads (in Settings as `metrics_dir`).
MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

_enabled: Path | None = None


def enable_multiprocess(directory: Path) -> Path:
    """Make this process write its metrics to `directory`; the directory in use.

    Once per process: the first call wins (a test process may start several
    servers; their metrics go to the first one's directory).
    """
    global _enabled
    if _enabled is not None:
        if directory != _enabled:
            log.warning("metrics already go to %s; not switching to %s", _enabled, directory)
        return _enabled
    directory.mkdir(parents=True, exist_ok=True)
    if not getattr(values.ValueClass, "_multiprocess", False):
        # Values made so far live in this process's memory only: drop them.
        for metric in metrics.ALL:
            metric.clear()
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    # prometheus-client names each process's files from this variable when it
    # first writes a value; setting it here keeps Settings the one reader of the
    # environment (it holds the same value, or the default under DATA_DIR).
    os.environ[MULTIPROC_VARIABLE] = str(directory)
    _enabled = directory
    return directory


def reset_directory(directory: Path) -> None:
    """Remove the value files of earlier runs (only `*.db` files, never the folder)."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink(missing_ok=True)


class QueueCollector(Collector):
    """`ingestion_queue_messages`: jobs waiting in the queue, read at scrape time."""

    def __init__(self, backlog: Callable[[], int]) -> None:
        self._backlog = backlog

    def collect(self) -> Iterator[Metric]:
        try:
            waiting = self._backlog()
        except Exception:
            # The scrape still answers; the gauge is missing while Redis is down.
            log.warning("job queue unreachable; %s left out", metrics.QUEUE_MESSAGES)
            return
        yield GaugeMetricFamily(
            metrics.QUEUE_MESSAGES,
            "Jobs waiting in the queue for a worker (delayed retries included).",
            value=waiting,
        )


@dataclass
class MetricsListener:
    """The HTTP listener serving the node's metrics; `port` is the bound one."""

    server: WSGIServer
    port: int

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve(directory: Path, port: int, backlog: Callable[[], int]) -> MetricsListener:
    """Listen on `port` (0: a free one) on every interface, in a daemon thread."""
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    registry.register(QueueCollector(backlog))
    server, _thread = start_http_server(port, addr="0.0.0.0", registry=registry)
    return MetricsListener(server, server.server_port)
