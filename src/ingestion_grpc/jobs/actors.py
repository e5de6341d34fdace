"""Dramatiq actors: `python -m dramatiq ingestion_grpc.jobs.actors`.

Thin on purpose: each takes plain ids and calls the engine. Delivery is at
least once, so every engine entry point is idempotent (claims in PostgreSQL,
unique constraints on the archive). The broker comes from REDIS_URL and
QUEUE_NAMESPACE when this module is imported, as Dramatiq's CLI expects.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage

from ingestion_grpc.config import Settings
from ingestion_grpc.domain.states import RunKind
from ingestion_grpc.engine import mailboxes, runs
from ingestion_grpc.engine.context import EngineContext
from ingestion_grpc.jobs import messages
from ingestion_grpc.jobs.queue import DramatiqJobQueue, redis_broker

logging.basicConfig(
    level=os.environ.get("LOG_LEVEL", "INFO"),
    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
)

MAX_RETRIES = 5
# Transient failures (a server down, a dropped connection) back off from 5 s
# to 5 min; the scheduler's own backoff takes over after the last retry.
RETRY_OPTIONS: dict[str, Any] = {
    "queue_name": messages.QUEUE,
    "max_retries": MAX_RETRIES,
    "min_backoff": 5_000,
    "max_backoff": 300_000,
    # A mailbox yields its worker every engine.mailboxes.SLICE_SECONDS; this
    # limit only catches a provider call that hangs.
    "time_limit": 3_600_000,
}

broker = redis_broker(
    os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    os.environ.get("QUEUE_NAMESPACE", "dramatiq"),
)
broker.add_middleware(CurrentMessage())
dramatiq.set_broker(broker)


@cache
def engine() -> EngineContext:
    """One context per worker process, built on first use."""
    return EngineContext.from_settings(Settings.from_env(), DramatiqJobQueue(broker))


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
