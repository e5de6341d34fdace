"""The scheduler: periodic syncs, the watchdog that revives lost work, and now
and then the sweeps of orphaned blobs (archive/sweep.py) and of unused uploads
(engine/upload_sweep.py).

`python -m ingestion_grpc.engine.scheduler` ticks every SCHEDULER_TICK. Any
number may run at once: every decision is a conditional UPDATE in PostgreSQL
(`domain/lifecycle.py`), so a source is claimed by one tick only, and a run
never starts twice.
"""

from __future__ import annotations

import logging
from typing import Protocol

from ingestion_grpc.archive.sweep import PeriodicSweep
from ingestion_grpc.domain import lifecycle
from ingestion_grpc.engine import upload_sweep
from ingestion_grpc.engine.context import EngineContext
from ingestion_grpc.engine.runs import finish_if_complete
from ingestion_grpc.providers.registry import PROVIDERS

log = logging.getLogger(__name__)


def syncable_providers() -> list[str]:
    return [name for name, cls in PROVIDERS.items() if cls.continuous_sync]


def tick(ctx: EngineContext) -> None:
    # Marked intact only once the lost work was sent again: a tick that fails
    # on the way leaves the sign for the next one.
    queue_emptied = ctx.jobs.was_emptied()
    schedule_due_syncs(ctx)
    revive_lost_runs(ctx, queue_emptied=queue_emptied)
    revive_lost_mailboxes(ctx, queue_emptied=queue_emptied)
    if queue_emptied:
        ctx.jobs.mark_intact()


def schedule_due_syncs(ctx: EngineContext) -> list[str]:
    """Claim every live source whose sync is due, and queue its sync."""
    with ctx.database.unit_of_work() as uow:
        claimed = lifecycle.claim_due_syncs(uow, ctx.jobs, ctx.sync_interval, syncable_providers())
        uow.commit()
    if claimed:
        log.info("scheduled %d syncs", len(claimed))
    return claimed


def revive_lost_runs(ctx: EngineContext, *, queue_emptied: bool = False) -> None:
    """Re-send runs whose start never reached a worker, and close finished ones."""
    with ctx.database.unit_of_work() as uow:
        lifecycle.revive_lost_runs(uow, ctx.jobs, ctx.stale_after, queue_emptied=queue_emptied)
        uow.commit()
        complete = lifecycle.complete_runs(uow)
    for run_id in complete:
        finish_if_complete(ctx, run_id)


def revive_lost_mailboxes(ctx: EngineContext, *, queue_emptied: bool = False) -> None:
    """Re-send mailboxes whose worker died, or whose job the queue lost."""
    with ctx.database.unit_of_work() as uow:
        lifecycle.revive_lost_mailboxes(uow, ctx.jobs, ctx.stale_after, queue_emptied=queue_emptied)
        uow.commit()


class Stopping(Protocol):
    """What `run_forever` waits on: a `threading.Event` or a `StopRequest`."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


def run_forever(ctx: EngineContext, every_seconds: float, stopping: Stopping) -> None:
    """Tick until `stopping` is set; a failed tick is logged and tried again."""
    log.info("scheduler ticking every %g s", every_seconds)
    orphans = PeriodicSweep()
    uploads = upload_sweep.PeriodicUploadSweep()
    while not stopping.is_set():
        try:
            tick(ctx)
            orphans.run_if_due(ctx.database, ctx.blobs)
            uploads.run_if_due(ctx)
        except Exception:
            log.exception("scheduler tick failed; trying again next tick")
        stopping.wait(every_seconds)
