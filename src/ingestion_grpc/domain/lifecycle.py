"""The life cycle of sources, runs and mailboxes: their states and every transition.

    source:   pending_auth -> auth_success -> importing (the initial import)
              idle (auth_success, active, error, imported) -> importing | syncing
              any -> paused; paused -> active (an interrupted run continues)
              importing | syncing -> active | imported (files) | error, when a run ends
    run:      running <-> paused; running -> completed | failed
    mailbox:  pending -> running -> done | failed | skipped
              running -> pending (paused, stale, or its time slice is used up)
              listed unreadable -> skipped

Every decision that two processes could race on is one conditional UPDATE in
PostgreSQL: a run is claimed by one request or scheduler tick only, a mailbox by
one worker only. The API (`domain/sources.py`), the scheduler and the workers
(`engine/`) change states only through this module. Jobs are sent after the
transaction commits, through the `JobQueue` interface that `jobs/` implements;
a claim whose job cannot be sent is given back.

The rules themselves (`run_may_start`, `run_outcome`, `status_after_run`, ...) are
plain functions, unit-tested without a database.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from functools import partial
from typing import Any

from sqlalchemy import (
    ColumnElement,
    String,
    Update,
    and_,
    any_,
    bindparam,
    exists,
    false,
    func,
    literal,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, insert

from ingestion_grpc.db.models import IngestionSource, RunMailbox, SyncSession, new_id
from ingestion_grpc.db.session import UnitOfWork
from ingestion_grpc.errors import Conflict, InvalidArgument
from ingestion_grpc.providers.base import Mailbox

log = logging.getLogger(__name__)

MAX_BACKOFF = timedelta(hours=6)


class SourceStatus(StrEnum):
    PENDING_AUTH = "pending_auth"
    AUTH_SUCCESS = "auth_success"
    IMPORTING = "importing"
    SYNCING = "syncing"
    ACTIVE = "active"
    PAUSED = "paused"
    ERROR = "error"
    IMPORTED = "imported"


class RunKind(StrEnum):
    IMPORT = "import"
    SYNC = "sync"


class RunState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"


class MailboxState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


RUNNING = frozenset({SourceStatus.IMPORTING, SourceStatus.SYNCING})
# Statuses from which a run may be claimed.
IDLE = frozenset(
    {SourceStatus.AUTH_SUCCESS, SourceStatus.ACTIVE, SourceStatus.ERROR, SourceStatus.IMPORTED}
)
# The statuses a client may set through Update; the rest are the engine's.
CLIENT_SETTABLE = frozenset({SourceStatus.ACTIVE, SourceStatus.PAUSED})
RUN_STATUS = {RunKind.IMPORT: SourceStatus.IMPORTING, RunKind.SYNC: SourceStatus.SYNCING}
KIND_OF_STATUS = {status: kind for kind, status in RUN_STATUS.items()}
OPEN_RUNS = (RunState.RUNNING, RunState.PAUSED)
UNFINISHED_MAILBOXES = (MailboxState.PENDING, MailboxState.RUNNING)


class JobQueue:
    """Interface: where runs and mailboxes are sent. `jobs/` implements it."""

    def enqueue_run(self, source_id: str, kind: RunKind) -> None:
        raise NotImplementedError

    def enqueue_mailbox(self, run_id: str, mailbox: str) -> None:
        raise NotImplementedError

    def backlog(self) -> int:
        """How many jobs wait to be picked up (delayed retries included)."""
        raise NotImplementedError

    def ping(self) -> None:
        """Raise Unavailable if the queue cannot take jobs now."""
        raise NotImplementedError

    def was_emptied(self) -> bool:
        """Whether the queue lost everything it held since `mark_intact` (a broker
        restarted without persistence, or flushed). A queue that cannot tell says no."""
        return False

    def mark_intact(self) -> None:
        """Remember that the queue holds what was sent, for `was_emptied`."""


def now() -> ColumnElement[datetime]:
    """The time, by the database's clock, for use inside a statement.

    Every engine timestamp that processes on different machines compare
    (heartbeats, leases and the stale checks, claims, cursors against runs) is
    PostgreSQL's, never a process's own: a worker whose clock is off must not
    look dead, or alive, for that. PostgreSQL's now() is its transaction's start.
    """
    return func.now()


def database_now(uow: UnitOfWork) -> datetime:
    """`now()` as a value, for rows built in Python."""
    moment: datetime | None = uow.session.scalar(select(func.now()))
    assert moment is not None
    return moment


# --- the rules ----------------------------------------------------------------------


def run_may_start(status: SourceStatus) -> None:
    """Raise Conflict unless a run may be claimed from `status`."""
    if status in IDLE:
        return
    if status == SourceStatus.PAUSED:
        raise Conflict("The source is paused: resume it before starting a run.")
    if status in RUNNING:
        raise Conflict("An import or sync is already running for this source.")
    raise Conflict(f"A run cannot start while the source is {status}.")


def client_may_set(current: SourceStatus, wanted: str) -> None:
    """Raise unless a client may move a source from `current` to `wanted`."""
    if wanted not in CLIENT_SETTABLE:
        raise InvalidArgument(
            "status", "may only be set to active or paused; other statuses are set by the engine"
        )
    if wanted == SourceStatus.ACTIVE and current in RUNNING:
        raise Conflict("An import or sync is running: pause the source instead.")


def run_outcome(states: Mapping[str, int], *, listing_failed: bool = False) -> RunState:
    """How a run whose mailboxes all ended came out.

    A failed mailbox fails the run. Skipped mailboxes do not, unless every one
    was skipped: a tenant none of whose mailboxes could be read is an error of the
    source (its credentials, its licences), not a success with nothing archived.
    """
    total = sum(states.values())
    skipped = states.get(MailboxState.SKIPPED, 0)
    if listing_failed or states.get(MailboxState.FAILED, 0) or (total and skipped == total):
        return RunState.FAILED
    return RunState.COMPLETED


def status_after_run(
    current: SourceStatus, kind: RunKind, outcome: RunState, *, continuous_sync: bool
) -> SourceStatus:
    """The source's status once a run of `kind` ended; a pause meanwhile is kept."""
    if current != RUN_STATUS[kind]:
        return current
    if outcome == RunState.FAILED:
        return SourceStatus.ERROR
    return SourceStatus.ACTIVE if continuous_sync else SourceStatus.IMPORTED


def next_sync_delay(interval: timedelta, consecutive_failures: int) -> timedelta:
    """The sync interval, doubled for each failed run in a row, up to MAX_BACKOFF."""
    if consecutive_failures == 0:
        return interval
    doubled: timedelta = interval * 2 ** min(consecutive_failures, 10)
    return min(doubled, MAX_BACKOFF)


# --- starting, pausing and resuming runs ---------------------------------------------


def open_run(uow: UnitOfWork, source_id: str) -> SyncSession | None:
    return uow.session.scalar(
        select(SyncSession)
        .where(SyncSession.source_id == source_id, SyncSession.status.in_(OPEN_RUNS))
        .order_by(SyncSession.started_at.desc())
        .limit(1)
    )


def _any_of(ids: list[str]) -> Any:
    """`column == _any_of(ids)`: one array parameter, however many ids."""
    return any_(bindparam("ids", ids, type_=ARRAY(String), unique=True))


def _open_or_resume_runs(uow: UnitOfWork, source_ids: list[str], kind: RunKind) -> None:
    """Right after sources are claimed: each one's open run, running again, or a new one.

    The run exists from the moment it is accepted, so a pause before any worker
    picked it up still leaves a run for the resume to continue. A few statements,
    however many sources (the scheduler claims thousands at once).
    """
    moment = now()
    resumed = set(
        uow.session.scalars(
            update(SyncSession)
            .where(SyncSession.source_id == _any_of(source_ids), SyncSession.status.in_(OPEN_RUNS))
            .values(status=RunState.RUNNING, heartbeat_at=moment)
            .returning(SyncSession.source_id)
            .execution_options(synchronize_session=False)
        )
    )
    fresh = [source_id for source_id in source_ids if source_id not in resumed]
    if not fresh:
        return
    uow.session.execute(
        insert(SyncSession).from_select(
            ["id", "source_id", "kind", "status", "started_at", "heartbeat_at"],
            select(
                func.gen_random_uuid().cast(String),
                IngestionSource.id,
                literal(kind.value),
                literal(RunState.RUNNING.value),
                moment,
                moment,
            ).where(IngestionSource.id == _any_of(fresh)),
        )
    )
    uow.session.execute(
        update(IngestionSource)
        .where(IngestionSource.id == _any_of(fresh))
        .values(
            last_sync_started_at=moment, last_sync_status_message=f"{kind.capitalize()} queued."
        )
        .execution_options(synchronize_session=False)
    )


def _open_or_resume_run(uow: UnitOfWork, source: IngestionSource, kind: RunKind) -> SyncSession:
    _open_or_resume_runs(uow, [source.id], kind)
    uow.session.refresh(source)
    run = uow.session.scalar(
        select(SyncSession)
        .where(SyncSession.source_id == source.id, SyncSession.status == RunState.RUNNING)
        .execution_options(populate_existing=True)
    )
    assert run is not None
    return run


def claim_run(
    uow: UnitOfWork, source: IngestionSource, kind: RunKind, jobs: JobQueue
) -> SyncSession:
    """Start (or continue) a run of `source`, for a request; Conflict if one may not.

    The job is sent after the commit; if it cannot be sent the claim is given back.
    """
    previous = SourceStatus(source.status)
    claimed = uow.session.execute(
        update(IngestionSource)
        .where(IngestionSource.id == source.id, IngestionSource.status.in_(IDLE))
        .values(status=RUN_STATUS[kind], run_requested_at=func.now())
        .returning(IngestionSource.id)
        .execution_options(synchronize_session=False)
    ).first()
    uow.session.refresh(source)
    if claimed is None:
        run_may_start(SourceStatus(source.status))
        raise Conflict(f"A run cannot start while the source is {source.status}.")
    run = _open_or_resume_run(uow, source, kind)
    uow.after_commit(partial(_send_or_release, uow, jobs, source.id, kind, previous))
    return run


def claim_due_syncs(
    uow: UnitOfWork, jobs: JobQueue, interval: timedelta, syncable_providers: list[str]
) -> list[str]:
    """Claim every live source whose sync is due (for the scheduler); their ids.

    Rows another scheduler is claiming are skipped, not waited for.
    """
    moment = now()
    due = list(
        uow.session.execute(
            select(IngestionSource.id, IngestionSource.status)
            .where(
                IngestionSource.status.in_([SourceStatus.ACTIVE, SourceStatus.ERROR]),
                IngestionSource.provider.in_(syncable_providers),
                (IngestionSource.next_sync_at.is_(None)) | (IngestionSource.next_sync_at <= moment),
            )
            .with_for_update(skip_locked=True)
        )
    )
    if not due:
        return []
    claimed = [source_id for source_id, _ in due]
    uow.session.execute(
        update(IngestionSource)
        .where(IngestionSource.id == _any_of(claimed))
        .values(
            status=SourceStatus.SYNCING, run_requested_at=moment, next_sync_at=moment + interval
        )
        .execution_options(synchronize_session=False)
    )
    _open_or_resume_runs(uow, claimed, RunKind.SYNC)
    for source_id, previous in due:
        uow.after_commit(
            partial(
                _send_or_release,
                uow,
                jobs,
                source_id,
                RunKind.SYNC,
                SourceStatus(previous),
                reraise=False,
            )
        )
    return claimed


def _send_or_release(
    uow: UnitOfWork,
    jobs: JobQueue,
    source_id: str,
    kind: RunKind,
    previous: SourceStatus,
    *,
    reraise: bool = True,
) -> None:
    try:
        jobs.enqueue_run(source_id, kind)
    except Exception:
        # The claim is committed but no worker will ever see it: give the
        # source back so that the caller (or the next tick) can try again.
        with uow.fresh() as retry:
            retry.session.execute(
                update(IngestionSource)
                .where(IngestionSource.id == source_id, IngestionSource.status == RUN_STATUS[kind])
                .values(status=previous)
            )
            retry.commit()
        log.warning("source %s: the %s job could not be sent; claim given back", source_id, kind)
        if reraise:
            raise


def pause(source: IngestionSource) -> None:
    """Pause from any status: a running job stops at its next batch, checkpoint saved."""
    source.status = SourceStatus.PAUSED


def set_status(uow: UnitOfWork, source: IngestionSource, wanted: str, jobs: JobQueue) -> None:
    """A client's pause or resume. Resuming continues the run the pause interrupted."""
    client_may_set(SourceStatus(source.status), wanted)
    if wanted == SourceStatus.PAUSED or source.status == SourceStatus.ACTIVE:
        source.status = wanted
        return
    interrupted = open_run(uow, source.id)
    source.status = SourceStatus.ACTIVE
    if interrupted is not None:
        uow.session.flush()
        claim_run(uow, source, RunKind(interrupted.kind), jobs)


# --- the mailboxes of a run ----------------------------------------------------------


def record_mailboxes(
    uow: UnitOfWork, run_id: str, mailboxes: list[Mailbox], cap: int, jobs: JobQueue
) -> int | None:
    """Add the listed mailboxes to the run and send as many as its cap allows.

    A mailbox the provider cannot read is recorded `skipped` with its reason. A
    run listed again (resumed after a pause, or its start job delivered twice)
    keeps the states its mailboxes reached. Returns how many were sent, or None
    when the run no longer exists.
    """
    # The run's row first, as every change to several of its mailboxes does: one
    # lock order, no deadlock with a claim.
    run = uow.session.get(SyncSession, run_id, with_for_update=True)
    if run is None:
        return None
    if mailboxes:
        uow.session.execute(
            insert(RunMailbox)
            .values(
                [
                    {
                        "run_id": run_id,
                        "mailbox": m.id,
                        "display_name": m.display_name,
                        "state": MailboxState.SKIPPED if m.skip_reason else MailboxState.PENDING,
                        "error_message": m.skip_reason,
                        "enqueued_at": None,
                        "updated_at": now(),
                    }
                    for m in mailboxes
                ]
            )
            .on_conflict_do_nothing()
        )
    run.max_concurrent_mailboxes = cap
    run.mailboxes_total = sum(mailbox_states(uow, run_id).values())
    run.listed_at = run.listed_at or database_now(uow)
    # Sent again from scratch: whatever was in the queue for this run before a
    # pause may be gone, and a job that does turn up is refused by the claim
    # while the cap is reached.
    uow.session.execute(
        update(RunMailbox)
        .where(RunMailbox.run_id == run_id, RunMailbox.state == MailboxState.PENDING)
        .values(enqueued_at=None)
    )
    return _send_waiting(uow, [run_id], jobs)


def _send_waiting(uow: UnitOfWork, run_ids: list[str], jobs: JobQueue) -> int:
    """Send the pending mailboxes of these runs that wait for a place, as many as
    each run's cap has free (running ones and sent ones hold a place), in name order.

    One statement for any number of runs. The caller holds the runs' row locks, so
    two callers cannot both fill one place.
    """
    taken = (
        select(RunMailbox.run_id, func.count().label("count"))
        .where(
            RunMailbox.run_id == _any_of(run_ids),
            (RunMailbox.state == MailboxState.RUNNING)
            | ((RunMailbox.state == MailboxState.PENDING) & RunMailbox.enqueued_at.is_not(None)),
        )
        .group_by(RunMailbox.run_id)
        .subquery()
    )
    free = (
        select(
            SyncSession.id.label("run_id"),
            (SyncSession.max_concurrent_mailboxes - func.coalesce(taken.c.count, 0)).label("free"),
        )
        .outerjoin(taken, taken.c.run_id == SyncSession.id)
        .where(SyncSession.id == _any_of(run_ids))
        .subquery()
    )
    waiting = (
        select(
            RunMailbox.run_id,
            RunMailbox.mailbox,
            func.row_number()
            .over(partition_by=RunMailbox.run_id, order_by=RunMailbox.mailbox)
            .label("position"),
        )
        .where(
            RunMailbox.run_id == _any_of(run_ids),
            RunMailbox.state == MailboxState.PENDING,
            RunMailbox.enqueued_at.is_(None),
        )
        .subquery()
    )
    chosen = (
        select(waiting.c.run_id, waiting.c.mailbox)
        .join(free, free.c.run_id == waiting.c.run_id)
        .where(waiting.c.position <= free.c.free)
    )
    sent = list(
        uow.session.execute(
            update(RunMailbox)
            .where(tuple_(RunMailbox.run_id, RunMailbox.mailbox).in_(chosen))
            .values(enqueued_at=now())
            .returning(RunMailbox.run_id, RunMailbox.mailbox)
            .execution_options(synchronize_session=False)
        )
    )
    for run_id, name in sorted(sent):
        uow.after_commit(partial(jobs.enqueue_mailbox, run_id, name))
    return len(sent)


@dataclass(frozen=True)
class MailboxClaim:
    """A worker's hold on one mailbox of a run."""

    run_id: str
    mailbox: str
    display_name: str
    lease: str
    source_id: str
    kind: RunKind
    run_started_at: datetime


def claim_mailbox(
    uow: UnitOfWork, run_id: str, mailbox: str, stale_after: timedelta
) -> MailboxClaim | None:
    """Take the mailbox for this worker, or None: done already, held by a live
    worker, its run's cap on mailboxes at once reached (it then waits for a
    place), or its source no longer runs (the run is then paused)."""
    run = uow.session.get(SyncSession, run_id, with_for_update=True)
    source = uow.session.get(IngestionSource, run.source_id) if run else None
    if run is None or source is None:
        return None
    stale_before = now() - stale_after
    this = (RunMailbox.run_id == run_id) & (RunMailbox.mailbox == mailbox)
    claimable = this & (
        (RunMailbox.state == MailboxState.PENDING)
        | ((RunMailbox.state == MailboxState.RUNNING) & (RunMailbox.heartbeat_at < stale_before))
    )
    others_running = (
        uow.session.scalar(
            select(func.count())
            .select_from(RunMailbox)
            .where(
                RunMailbox.run_id == run_id,
                RunMailbox.mailbox != mailbox,
                RunMailbox.state == MailboxState.RUNNING,
                RunMailbox.heartbeat_at >= stale_before,
            )
        )
        or 0
    )
    if others_running >= run.max_concurrent_mailboxes:
        uow.session.execute(update(RunMailbox).where(claimable).values(enqueued_at=None))
        return None
    lease = new_id()
    claimed = uow.session.execute(
        update(RunMailbox)
        .where(claimable)
        .values(state=MailboxState.RUNNING, lease=lease, heartbeat_at=now(), updated_at=now())
        .returning(RunMailbox.display_name)
    ).first()
    if claimed is None:
        return None
    kind = RunKind(run.kind)
    claim = MailboxClaim(
        run_id, mailbox, claimed[0] or mailbox, lease, source.id, kind, run.started_at
    )
    if source.status != RUN_STATUS[kind]:
        release_mailbox(uow, claim, pause_run=True)
        return None
    return claim


def held(claim: MailboxClaim) -> Update:
    """An UPDATE of the claimed mailbox row that matches only while the lease holds."""
    return update(RunMailbox).where(
        RunMailbox.run_id == claim.run_id,
        RunMailbox.mailbox == claim.mailbox,
        RunMailbox.lease == claim.lease,
    )


def report_alive(uow: UnitOfWork, claim: MailboxClaim) -> bool:
    """Refresh the claimed mailbox's heartbeat; False once the lease is lost
    (the watchdog gave the mailbox to another worker)."""
    return (
        uow.session.execute(
            held(claim)
            .where(RunMailbox.state == MailboxState.RUNNING)
            .values(heartbeat_at=now())
            .returning(RunMailbox.run_id)
        ).first()
        is not None
    )


def release_mailbox(
    uow: UnitOfWork,
    claim: MailboxClaim,
    *,
    pause_run: bool,
    requeue: JobQueue | None = None,
    reason: str | None = None,
) -> None:
    """Hand the mailbox back (pending) if this worker still holds it.

    `pause_run` when its source was paused; `requeue` to send it again at once
    (its time slice is used up, or its database went away, not its work);
    `reason`, why it waits (shown with the run's mailboxes until it ends).
    """
    uow.session.execute(
        held(claim).values(
            state=MailboxState.PENDING,
            lease=None,
            enqueued_at=now() if requeue else None,
            updated_at=now(),
            **({} if reason is None else {"error_message": reason}),
        )
    )
    if pause_run:
        uow.session.execute(
            update(SyncSession)
            .where(SyncSession.id == claim.run_id, SyncSession.status == RunState.RUNNING)
            .values(status=RunState.PAUSED)
        )
    if requeue is not None:
        uow.after_commit(partial(requeue.enqueue_mailbox, claim.run_id, claim.mailbox))


def end_mailbox(
    uow: UnitOfWork, claim: MailboxClaim, state: MailboxState, reason: str, jobs: JobQueue
) -> None:
    """done, failed (with its error) or skipped (with why); the next waiting one is sent."""
    run = uow.session.get(SyncSession, claim.run_id, with_for_update=True)
    uow.session.execute(
        held(claim).values(
            state=state, lease=None, error_message=reason, heartbeat_at=now(), updated_at=now()
        )
    )
    if run is not None and run.status == RunState.RUNNING:
        _send_waiting(uow, [claim.run_id], jobs)


def source_of_run(uow: UnitOfWork, run_id: str) -> str | None:
    return uow.session.scalar(select(SyncSession.source_id).where(SyncSession.id == run_id))


def mailbox_states(uow: UnitOfWork, run_id: str) -> dict[str, int]:
    rows = uow.session.execute(
        select(RunMailbox.state, func.count())
        .where(RunMailbox.run_id == run_id)
        .group_by(RunMailbox.state)
    )
    return {state: count for state, count in rows}


# --- the end of a run ----------------------------------------------------------------


@dataclass(frozen=True)
class RunEnd:
    """What ending a run decided, for the caller's after-commit work."""

    source_id: str
    kind: RunKind
    outcome: RunState


def end_run_if_complete(
    uow: UnitOfWork, run_id: str, interval: timedelta, continuous_sync: bool
) -> RunEnd | None:
    """Close the run once its mailboxes are listed and none is pending or running."""
    run = uow.session.get(SyncSession, run_id, with_for_update=True)
    if run is None or run.status not in OPEN_RUNS or run.listed_at is None:
        return None
    states = mailbox_states(uow, run_id)
    if any(states.get(s, 0) for s in UNFINISHED_MAILBOXES):
        return None
    errors = list(
        uow.session.scalars(
            select(
                func.coalesce(func.nullif(RunMailbox.display_name, ""), RunMailbox.mailbox)
                + ": "
                + RunMailbox.error_message
            )
            .where(RunMailbox.run_id == run_id, RunMailbox.state == MailboxState.FAILED)
            .order_by(RunMailbox.mailbox)
            .limit(3)
        )
    )
    error = "; ".join(errors)
    if not error and run_outcome(states) == RunState.FAILED:
        error = "no mailbox of the source could be read (every one was skipped)"
    return _close(uow, run, states, error, interval, continuous_sync)


def end_run_unlisted(
    uow: UnitOfWork, run_id: str, error: str, interval: timedelta, continuous_sync: bool
) -> RunEnd | None:
    """Close the run as failed before any mailbox ran (listing them failed)."""
    run = uow.session.get(SyncSession, run_id, with_for_update=True)
    if run is None or run.status not in OPEN_RUNS:
        return None
    states = mailbox_states(uow, run_id)
    return _close(uow, run, states, error, interval, continuous_sync, listing_failed=True)


def _close(
    uow: UnitOfWork,
    run: SyncSession,
    states: Mapping[str, int],
    error: str,
    interval: timedelta,
    continuous_sync: bool,
    listing_failed: bool = False,
) -> RunEnd | None:
    finished = database_now(uow)
    outcome = run_outcome(states, listing_failed=listing_failed)
    run.mailboxes_done = states.get(MailboxState.DONE, 0)
    run.mailboxes_failed = states.get(MailboxState.FAILED, 0)
    run.mailboxes_skipped = states.get(MailboxState.SKIPPED, 0)
    run.status = outcome
    run.finished_at = finished
    run.error_message = error
    source = uow.session.get(IngestionSource, run.source_id, with_for_update=True)
    if source is None:
        return None
    kind = RunKind(run.kind)
    failed = outcome == RunState.FAILED
    source.consecutive_failures = source.consecutive_failures + 1 if failed else 0
    source.next_sync_at = finished + next_sync_delay(interval, source.consecutive_failures)
    source.status = status_after_run(
        SourceStatus(source.status), kind, outcome, continuous_sync=continuous_sync
    )
    source.last_sync_finished_at = finished
    source.last_sync_status_message = _summary(run, failed)
    log.info(
        "run %s of source %s %s: %s", run.id, source.id, outcome, source.last_sync_status_message
    )
    return RunEnd(source.id, kind, outcome)


def _summary(run: SyncSession, failed: bool) -> str:
    verb = "Imported" if run.kind == RunKind.IMPORT else "Synced"
    counts = (
        f"{run.messages_archived} new messages archived, "
        f"{run.messages_already_present} already present, "
        f"from {run.mailboxes_done} of {run.mailboxes_total} mailboxes"
    )
    if run.mailboxes_skipped:
        counts += f" ({run.mailboxes_skipped} skipped)"
    if run.messages_skipped or run.messages_failed:
        counts += (
            f"; {run.messages_skipped} messages skipped (gone from the source), "
            f"{run.messages_failed} failed (tried again next run)"
        )
    if not failed:
        return f"{verb}: {counts}."
    if run.mailboxes_total == 0:
        return f"{verb[:-2]} failed: {run.error_message}"
    return (
        f"{verb} with errors: {run.mailboxes_failed} of {run.mailboxes_total} mailboxes failed "
        f"({run.error_message}); {counts}."
    )


# --- stale-run recovery ----------------------------------------------------------------


def revive_lost_runs(
    uow: UnitOfWork, jobs: JobQueue, stale_after: timedelta, *, queue_emptied: bool = False
) -> list[str]:
    """Re-send claimed runs whose start never reached a worker; their source ids.

    A claimed run normally waits in the queue; only once the queue is empty can
    it be known lost (its worker died before listing mailboxes, or Redis lost it).
    `queue_emptied`: the queue lost everything (`JobQueue.was_emptied`), so every
    claimed run not yet listed is sent again at once; one a worker is listing
    right now is listed twice, which changes nothing.
    """
    if jobs.backlog() != 0 and not queue_emptied:
        return []
    stale_before = now() - stale_after
    started = SyncSession.listed_at.is_not(None)
    live_run = exists().where(
        SyncSession.source_id == IngestionSource.id,
        SyncSession.status == RunState.RUNNING,
        started if queue_emptied else started | (SyncSession.heartbeat_at >= stale_before),
    )
    lost = list(
        uow.session.execute(
            update(IngestionSource)
            .where(
                IngestionSource.status.in_(RUNNING),
                true() if queue_emptied else IngestionSource.run_requested_at < stale_before,
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
    for source_id, status in lost:
        uow.after_commit(partial(jobs.enqueue_run, source_id, KIND_OF_STATUS[SourceStatus(status)]))
        log.warning("source %s was claimed but its run never started: re-sent", source_id)
    return [source_id for source_id, _ in lost]


def complete_runs(uow: UnitOfWork) -> list[str]:
    """Open runs whose mailboxes have all ended (their last worker died before closing)."""
    return list(
        uow.session.scalars(
            select(SyncSession.id).where(
                SyncSession.status == RunState.RUNNING,
                SyncSession.listed_at.is_not(None),
                ~exists().where(
                    RunMailbox.run_id == SyncSession.id,
                    RunMailbox.state.in_(UNFINISHED_MAILBOXES),
                ),
            )
        )
    )


def revive_lost_mailboxes(
    uow: UnitOfWork, jobs: JobQueue, stale_after: timedelta, *, queue_emptied: bool = False
) -> int:
    """Re-send mailboxes whose worker died, or whose job the queue lost, and fill
    places a dead worker left under a run's cap. How many were sent.

    `queue_emptied`: the queue lost everything, so every sent mailbox is sent
    again at once (a worker that had already taken one refuses the copy)."""
    stale_before = now() - stale_after
    in_running_run = exists().where(
        and_(SyncSession.id == RunMailbox.run_id, SyncSession.status == RunState.RUNNING)
    )
    dead = (RunMailbox.state == MailboxState.RUNNING) & (RunMailbox.heartbeat_at < stale_before)
    in_queue = (RunMailbox.state == MailboxState.PENDING) & RunMailbox.enqueued_at.is_not(None)
    # A sent mailbox normally waits in the queue; only once the queue is empty
    # can it be known lost (its job dropped, say).
    lost: ColumnElement[bool]
    if queue_emptied:
        lost = in_queue
    elif jobs.backlog() == 0:
        lost = in_queue & (RunMailbox.enqueued_at < stale_before)
    else:
        lost = false()
    revived = list(
        uow.session.execute(
            update(RunMailbox)
            .where(in_running_run, dead | lost)
            .values(state=MailboxState.PENDING, lease=None, enqueued_at=now())
            .returning(RunMailbox.run_id, RunMailbox.mailbox)
        )
    )
    for run_id, mailbox in revived:
        uow.after_commit(partial(jobs.enqueue_mailbox, run_id, mailbox))
        log.warning("mailbox %s of run %s was stale: re-sent", mailbox, run_id)
    # Locked first (as every change to several of a run's mailboxes does), then filled.
    waiting_runs = list(
        uow.session.scalars(
            select(SyncSession.id)
            .where(
                SyncSession.status == RunState.RUNNING,
                exists().where(
                    RunMailbox.run_id == SyncSession.id,
                    RunMailbox.state == MailboxState.PENDING,
                    RunMailbox.enqueued_at.is_(None),
                ),
            )
            .with_for_update()
        )
    )
    sent = _send_waiting(uow, waiting_runs, jobs) if waiting_runs else 0
    return len(revived) + sent
