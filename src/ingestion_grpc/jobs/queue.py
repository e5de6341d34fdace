"""The job queue the domain sends runs to: Dramatiq on Redis."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from ingestion_grpc.domain.lifecycle import JobQueue, RunKind
from ingestion_grpc.errors import Unavailable
from ingestion_grpc.jobs import messages

_ACTOR_FOR_RUN = {RunKind.IMPORT: messages.IMPORT_SOURCE, RunKind.SYNC: messages.SYNC_SOURCE}


def redis_broker(redis_url: str, namespace: str = "dramatiq") -> RedisBroker:
    return RedisBroker(url=redis_url, namespace=namespace)  # type: ignore[no-untyped-call]


class DramatiqJobQueue(JobQueue):
    def __init__(self, broker: RedisBroker) -> None:
        self._broker = broker

    def enqueue_run(self, source_id: str, kind: RunKind) -> None:
        self._send(_ACTOR_FOR_RUN[kind], source_id)

    def enqueue_mailbox(self, run_id: str, mailbox: str) -> None:
        self._send(messages.INGEST_MAILBOX, run_id, mailbox)

    def _send(self, actor_name: str, *args: str) -> None:
        message: dramatiq.Message[None] = dramatiq.Message(
            queue_name=messages.QUEUE, actor_name=actor_name, args=args, kwargs={}, options={}
        )
        try:
            self._broker.enqueue(message)
        except Exception as exc:
            raise Unavailable("The job queue is unavailable; try again shortly.") from exc

    def backlog(self) -> int:
        prefix = f"{self._broker.namespace}:{messages.QUEUE}"
        waiting: int = self._broker.client.llen(prefix) + self._broker.client.llen(f"{prefix}.DQ")
        return waiting

    def was_emptied(self) -> bool:
        # Redis keeps no trace of a restart without persistence; a key of our
        # own that is gone is the trace.
        return not self._broker.client.exists(self._intact_key)

    def mark_intact(self) -> None:
        self._broker.client.set(self._intact_key, "1")

    @property
    def _intact_key(self) -> str:
        return f"{self._broker.namespace}:{messages.QUEUE}.intact"

    def ping(self) -> None:
        try:
            self._broker.client.ping()
        except Exception as exc:
            raise Unavailable("The job queue is unavailable.") from exc
