"""A run: open it, list the source's mailboxes, fan out, and close it.

A run is a `SyncSession` row. It stays open (running or paused) until every
mailbox of it is done or failed; then the source moves on to `active`,
`imported` or `error`, unless it was paused meanwhile.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from functools import partial

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert

from ingestion_grpc.db.models import IngestionSource, RunMailbox, SyncSession
from ingestion_grpc.db.session import UnitOfWork
from ingestion_grpc.domain.states import RUN_STATUS, RunKind, SourceStatus
from ingestion_grpc.engine.context import EngineContext
from ingestion_grpc.errors import IngestionError, ProviderUnavailable
from ingestion_grpc.providers.registry import provider_class

log = logging.getLogger(__name__)

MAX_BACKOFF = timedelta(hours=6)


class RunState:
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    OPEN = (RUNNING, PAUSED)


class MailboxState:
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    UNFINISHED = (PENDING, RUNNING)


def now() -> datetime:
    return datetime.now(UTC)


def open_run(uow: UnitOfWork, source_id: str) -> SyncSession | None:
    return uow.session.scalar(
        select(SyncSession)
        .where(SyncSession.source_id == source_id, SyncSession.status.in_(RunState.OPEN))
        .order_by(SyncSession.started_at.desc())
        .limit(1)
    )


def open_or_resume_run(uow: UnitOfWork, source: IngestionSource, kind: RunKind) -> SyncSession:
    """Right after a source is claimed: its open run, running again, or a new one.

    The run exists from the moment it is accepted, so a pause before any worker
    picked it up still leaves a run for the resume to continue.
    """
    run = open_run(uow, source.id)
    if run is None:
        started = now()
        run = SyncSession(
            source_id=source.id, kind=kind, status=RunState.RUNNING, started_at=started
        )
        uow.session.add(run)
        source.last_sync_started_at = started
        source.last_sync_status_message = f"{kind.capitalize()} queued."
    run.status = RunState.RUNNING
    run.heartbeat_at = now()
    uow.session.flush()
    return run


def start_run(ctx: EngineContext, source_id: str, kind: RunKind, *, final_attempt: bool) -> None:
    """Open (or reopen) the source's run, list its mailboxes, queue one job each."""
    with ctx.database.unit_of_work() as uow:
        source = uow.session.get(IngestionSource, source_id, with_for_update=True)
        if source is None or source.status != RUN_STATUS[kind]:
            return  # deleted, paused, or a duplicate message: nothing to do
        run = open_or_resume_run(uow, source, kind)
        uow.commit()
        run_id = run.id
        provider = ctx.provider_for(source)

    try:
        mailboxes = provider.list_mailboxes()
    except ProviderUnavailable as error:
        if not final_attempt:
            raise
        close_run(ctx, run_id, error=f"could not list mailboxes: {error}")
        return
    except IngestionError as error:
        close_run(ctx, run_id, error=f"could not list mailboxes: {error}")
        return

    with ctx.database.unit_of_work() as uow:
        if mailboxes:
            uow.session.execute(
                insert(RunMailbox)
                .values(
                    [
                        {"run_id": run_id, "mailbox": m, "state": MailboxState.PENDING}
                        for m in mailboxes
                    ]
                )
                .on_conflict_do_nothing()
            )
        listed = uow.session.get(SyncSession, run_id, with_for_update=True)
        if listed is None:
            return  # the source was deleted meanwhile
        listed.mailboxes_total = _count(uow, run_id)
        listed.listed_at = listed.listed_at or now()
        pending = list(
            uow.session.scalars(
                select(RunMailbox).where(
                    RunMailbox.run_id == run_id, RunMailbox.state == MailboxState.PENDING
                )
            )
        )
        for row in pending:
            row.enqueued_at = now()
        names = [row.mailbox for row in pending]
        for name in names:
            uow.after_commit(partial(ctx.jobs.enqueue_mailbox, run_id, name))
        uow.commit()
    log.info("run %s of source %s: %d mailboxes queued", run_id, source_id, len(names))
    finish_if_complete(ctx, run_id)


def finish_if_complete(ctx: EngineContext, run_id: str) -> None:
    """Close the run once no mailbox of it is pending or running."""
    with ctx.database.unit_of_work() as uow:
        run = uow.session.get(SyncSession, run_id, with_for_update=True)
        if run is None or run.status not in RunState.OPEN or run.listed_at is None:
            return
        states = _states(uow, run_id)
        if any(states.get(s, 0) for s in MailboxState.UNFINISHED):
            return
        errors = list(
            uow.session.scalars(
                select(RunMailbox.mailbox + ": " + RunMailbox.error_message)
                .where(RunMailbox.run_id == run_id, RunMailbox.state == MailboxState.FAILED)
                .order_by(RunMailbox.mailbox)
                .limit(3)
            )
        )
        source = _close(uow, run, states, "; ".join(errors), ctx.sync_interval)
        uow.commit()
    if source is not None and run.status == RunState.COMPLETED and run.kind == RunKind.IMPORT:
        # Only now may a one-shot input (an uploaded file) go: every message is in.
        ctx.provider_for(source).after_successful_import()


def close_run(ctx: EngineContext, run_id: str, error: str) -> None:
    """Close the run as failed before any mailbox ran (listing them failed)."""
    with ctx.database.unit_of_work() as uow:
        run = uow.session.get(SyncSession, run_id, with_for_update=True)
        if run is None or run.status not in RunState.OPEN:
            return
        _close(uow, run, _states(uow, run_id), error, ctx.sync_interval, listing_failed=True)
        uow.commit()


def _close(
    uow: UnitOfWork,
    run: SyncSession,
    states: dict[str, int],
    error: str,
    interval: timedelta,
    listing_failed: bool = False,
) -> IngestionSource | None:
    """Close the run and move its source on; the source, unless it was deleted."""
    finished = now()
    run.mailboxes_done = states.get(MailboxState.DONE, 0)
    run.mailboxes_failed = states.get(MailboxState.FAILED, 0)
    failed = listing_failed or run.mailboxes_failed > 0
    run.status = RunState.FAILED if failed else RunState.COMPLETED
    run.finished_at = finished
    run.error_message = error
    source = uow.session.get(IngestionSource, run.source_id, with_for_update=True)
    if source is None:
        return None
    if failed:
        source.consecutive_failures += 1
        backoff = min(interval * 2 ** min(source.consecutive_failures, 10), MAX_BACKOFF)
        source.next_sync_at = finished + backoff
    else:
        source.consecutive_failures = 0
        source.next_sync_at = finished + interval
    if source.status == RUN_STATUS[RunKind(run.kind)]:
        if failed:
            source.status = SourceStatus.ERROR
        elif provider_class(source.provider).continuous_sync:
            source.status = SourceStatus.ACTIVE
        else:
            source.status = SourceStatus.IMPORTED
    source.last_sync_finished_at = finished
    source.last_sync_status_message = _summary(run, failed)
    log.info(
        "run %s of source %s %s: %s", run.id, source.id, run.status, source.last_sync_status_message
    )
    return source


def _summary(run: SyncSession, failed: bool) -> str:
    verb = "Imported" if run.kind == RunKind.IMPORT else "Synced"
    counts = (
        f"{run.messages_archived} new messages archived, "
        f"{run.messages_already_present} already present, "
        f"from {run.mailboxes_done} of {run.mailboxes_total} mailboxes"
    )
    if not failed:
        return f"{verb}: {counts}."
    if run.mailboxes_total == 0:
        return f"{verb[:-2]} failed: {run.error_message}"
    return (
        f"{verb} with errors: {run.mailboxes_failed} of {run.mailboxes_total} mailboxes failed "
        f"({run.error_message}); {counts}."
    )


def _states(uow: UnitOfWork, run_id: str) -> dict[str, int]:
    rows = uow.session.execute(
        select(RunMailbox.state, func.count())
        .where(RunMailbox.run_id == run_id)
        .group_by(RunMailbox.state)
    )
    return {state: count for state, count in rows}


def _count(uow: UnitOfWork, run_id: str) -> int:
    return sum(_states(uow, run_id).values())
