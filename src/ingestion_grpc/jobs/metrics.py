"""Dramatiq middleware: how long jobs wait in the queue and how long they take.

Dramatiq ships a Prometheus middleware, but it runs an HTTP server of its own in
every worker (port 9191) and keeps its files apart; this one writes to the same
multiprocess metrics as the rest of the service, so the server's `/metrics` has
them. The queue's depth is read by the server at scrape time.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

from ingestion_grpc.telemetry import metrics


class JobMetrics(Middleware):
    """Observes `ingestion_job_wait_seconds` and `ingestion_job_seconds`."""

    def __init__(self) -> None:
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()

    def before_process_message(
        self, broker: dramatiq.Broker, message: dramatiq.MessageProxy
    ) -> None:
        now = time.time()
        # Due when sent, or when its delay (a retry's backoff) ran out.
        due_ms = message.options.get("eta", message.message_timestamp)
        waited = max(0.0, now - due_ms / 1000)
        metrics.JOB_WAIT_SECONDS.labels(message.actor_name).observe(waited)
        with self._lock:
            self._started[message.message_id] = time.monotonic()

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        self._finish(message, "ok" if exception is None else "error")

    def after_skip_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        self._finish(message, "skipped")

    def _finish(self, message: dramatiq.MessageProxy, outcome: str) -> None:
        with self._lock:
            started = self._started.pop(message.message_id, None)
        if started is not None:
            metrics.JOB_SECONDS.labels(message.actor_name, outcome).observe(
                time.monotonic() - started
            )
