"""The scheduler: periodic syncs, and the watchdog that revives lost work.

`python -m ingestion_grpc.engine.scheduler` ticks every SCHEDULER_TICK. Any
number may run at once: every decision is a conditional UPDATE in PostgreSQL,
so a source is claimed by one tick only, and a run never starts twice.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from functools import partial
from types import FrameType

from sqlalchemy import and_, exists, false, select, update

from ingestion_grpc.config import Settings
from ingestion_grpc.db.migrate import upgrade_to_head
from ingestion_grpc.db.models import IngestionSource, RunMailbox, SyncSession
from ingestion_grpc.domain.states import RUNNING, RunKind, SourceStatus
from ingestion_grpc.engine.context import EngineContext
from ingestion_grpc.engine.runs import (
    MailboxState,
    RunState,
    finish_if_complete,
    now,
    open_or_resume_run,
)
from ingestion_grpc.jobs.queue import DramatiqJobQueue, redis_broker
from ingestion_grpc.providers.registry import PROVIDERS

log = logging.getLogger(__name__)

SYNCABLE_PROVIDERS = [name for name, cls in PROVIDERS.items() if cls.continuous_sync]
_KIND_OF_STATUS = {SourceStatus.IMPORTING: RunKind.IMPORT, SourceStatus.SYNCING: RunKind.SYNC}


def tick(ctx: EngineContext) -> None:
    schedule_due_syncs(ctx)
    revive_lost_runs(ctx)
    revive_lost_mailboxes(ctx)


def schedule_due_syncs(ctx: EngineContext) -> list[str]:
    """Claim every live source whose sync is due, and queue its sync."""
    moment = now()
    with ctx.database.unit_of_work() as uow:
        claimed = list(
            uow.session.scalars(
                update(IngestionSource)
                .where(
                    IngestionSource.status.in_([SourceStatus.ACTIVE, SourceStatus.ERROR]),
                    IngestionSource.provider.in_(SYNCABLE_PROVIDERS),
                    (IngestionSource.next_sync_at.is_(None))
                    | (IngestionSource.next_sync_at <= moment),
                )
                .values(
                    status=SourceStatus.SYNCING,
                    run_requested_at=moment,
                    next_sync_at=moment + ctx.sync_interval,
                )
                .returning(IngestionSource.id)
            )
        )
        for source_id in claimed:
            source = uow.session.get(IngestionSource, source_id)
            assert source is not None
            open_or_resume_run(uow, source, RunKind.SYNC)
            uow.after_commit(partial(ctx.jobs.enqueue_run, source_id, RunKind.SYNC))
        uow.commit()
    if claimed:
        log.info("scheduled %d syncs", len(claimed))
    return claimed


def revive_lost_runs(ctx: EngineContext) -> None:
    """Re-send runs whose start never reached a worker, and close finished ones.

    A claimed run normally waits in the queue; only once the queue is empty can
    it be known lost (its worker died before listing mailboxes, or Redis lost it).
    """
    stale_before = now() - ctx.stale_after
    queue_is_empty = ctx.jobs.backlog() == 0
    live_run = exists().where(
        SyncSession.source_id == IngestionSource.id,
        SyncSession.status == RunState.RUNNING,
        (SyncSession.listed_at.is_not(None)) | (SyncSession.heartbeat_at >= stale_before),
    )
    with ctx.database.unit_of_work() as uow:
        lost = (
            list(
                uow.session.execute(
                    update(IngestionSource)
                    .where(
                        IngestionSource.status.in_(RUNNING),
                        IngestionSource.run_requested_at < stale_before,
                        ~live_run,
                        # A paused run is resumed by the user, not by the watchdog.
                        ~exists().where(
                            SyncSession.source_id == IngestionSource.id,
                            SyncSession.status == RunState.PAUSED,
                        ),
                    )
                    .values(run_requested_at=now())
                    .returning(IngestionSource.id, IngestionSource.status)
                )
            )
            if queue_is_empty
            else []
        )
        for source_id, status in lost:
            uow.after_commit(
                partial(ctx.jobs.enqueue_run, source_id, _KIND_OF_STATUS[SourceStatus(status)])
            )
        uow.commit()
        complete = list(
            uow.session.scalars(
                select(SyncSession.id).where(
                    SyncSession.status == RunState.RUNNING,
                    SyncSession.listed_at.is_not(None),
                    ~exists().where(
                        RunMailbox.run_id == SyncSession.id,
                        RunMailbox.state.in_(MailboxState.UNFINISHED),
                    ),
                )
            )
        )
    for source_id, _ in lost:
        log.warning("source %s was claimed but its run never started: re-sent", source_id)
    for run_id in complete:
        finish_if_complete(ctx, run_id)


def revive_lost_mailboxes(ctx: EngineContext) -> None:
    """Re-send mailboxes whose worker died, or whose job the queue lost."""
    stale_before = now() - ctx.stale_after
    queue_is_empty = ctx.jobs.backlog() == 0
    in_running_run = exists().where(
        and_(SyncSession.id == RunMailbox.run_id, SyncSession.status == RunState.RUNNING)
    )
    dead = (RunMailbox.state == MailboxState.RUNNING) & (RunMailbox.heartbeat_at < stale_before)
    # A pending mailbox is normally waiting in the queue; only once the queue
    # is empty can it be known lost (a Redis restart, say).
    lost = (
        (RunMailbox.state == MailboxState.PENDING) & (RunMailbox.enqueued_at < stale_before)
        if queue_is_empty
        else false()
    )
    with ctx.database.unit_of_work() as uow:
        revived = list(
            uow.session.execute(
                update(RunMailbox)
                .where(in_running_run, dead | lost)
                .values(state=MailboxState.PENDING, lease=None, enqueued_at=now())
                .returning(RunMailbox.run_id, RunMailbox.mailbox)
            )
        )
        for run_id, mailbox in revived:
            uow.after_commit(partial(ctx.jobs.enqueue_mailbox, run_id, mailbox))
        uow.commit()
    for run_id, mailbox in revived:
        log.warning("mailbox %s of run %s was stale: re-sent", mailbox, run_id)


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = Settings.from_env()
    jobs = DramatiqJobQueue(redis_broker(settings.redis_url, settings.queue_namespace))
    ctx = EngineContext.from_settings(settings, jobs)
    # The scheduler may start before any server: the schema must exist first.
    upgrade_to_head(ctx.database.engine)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("scheduler ticking every %s", settings.scheduler_tick)
    while not stopping.is_set():
        try:
            tick(ctx)
        except Exception:
            log.exception("scheduler tick failed; trying again next tick")
        stopping.wait(settings.scheduler_tick.total_seconds())
    ctx.database.dispose()


if __name__ == "__main__":
    main()
