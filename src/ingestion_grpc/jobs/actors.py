"""Dramatiq actors: `python -m dramatiq ingestion_grpc.jobs.actors`.

Thin on purpose: each takes plain ids and calls the engine. Delivery is at
least once, so every engine entry point is idempotent (claims in PostgreSQL,
unique constraints on the archive). Settings are read (and the broker made)
when this module is imported, as Dramatiq's CLI expects; a bad setting stops
the worker with a line naming it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage

from ingestion_grpc import bootstrap
from ingestion_grpc.domain.lifecycle import RunKind
from ingestion_grpc.engine import mailboxes, runs
from ingestion_grpc.engine.context import EngineContext
from ingestion_grpc.jobs import messages
from ingestion_grpc.jobs.metrics import JobMetrics
from ingestion_grpc.jobs.queue import DramatiqJobQueue, redis_broker

settings = bootstrap.settings_or_exit()
bootstrap.configure_logging(settings)
bootstrap.configure_metrics(settings)

MAX_RETRIES = 5
# Transient failures (a server down, a dropped connection) back off from 5 s
# to 5 min; the scheduler's own backoff takes over after the last retry.
RETRY_OPTIONS: dict[str, Any] = {
    "queue_name": messages.QUEUE,
    "max_retries": MAX_RETRIES,
    "min_backoff": 5_000,
    "max_backoff": 300_000,
    # A mailbox yields its worker every engine.mailboxes.SLICE_SECONDS; this
    # limit only catches a provider call that hangs (one it cannot interrupt, in
    # C code, is caught by engine.heartbeat.HUNG_BATCH_SECONDS, as long).
    "time_limit": 3_600_000,
}

broker = redis_broker(settings.redis_url, settings.queue_namespace)
broker.add_middleware(CurrentMessage())
broker.add_middleware(JobMetrics())
dramatiq.set_broker(broker)


@cache
def engine() -> EngineContext:
    """One context per worker process, built on first use."""
    return bootstrap.engine_context(settings, DramatiqJobQueue(broker))


def final_attempt() -> bool:
    message = CurrentMessage.get_current_message()
    return message is None or message.options.get("retries", 0) >= MAX_RETRIES


@dramatiq.actor(actor_name=messages.IMPORT_SOURCE, **RETRY_OPTIONS)
def import_source(source_id: str) -> None:
    runs.start_run(engine(), source_id, RunKind.IMPORT, final_attempt=final_attempt())


@dramatiq.actor(actor_name=messages.SYNC_SOURCE, **RETRY_OPTIONS)
def sync_source(source_id: str) -> None:
    runs.start_run(engine(), source_id, RunKind.SYNC, final_attempt=final_attempt())


@dramatiq.actor(actor_name=messages.INGEST_MAILBOX, **RETRY_OPTIONS)
def ingest_mailbox(run_id: str, mailbox: str) -> None:
    mailboxes.ingest_mailbox(engine(), run_id, mailbox, final_attempt=final_attempt())
