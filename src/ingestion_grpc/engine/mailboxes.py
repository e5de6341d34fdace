"""One mailbox of a run: fetch, store the bytes, record them, move the cursor.

Per batch, one transaction: the metadata rows, then (once the batch's blobs are
durable) a check that this worker still holds the mailbox's lease, the new cursor,
the run's counters and the heartbeat, then COMMIT. The blobs are written in a
thread while the rows are inserted, and the next batch is read from the provider
while this one is stored (`read_ahead`), but nothing commits before its bytes are
durable: the cursor never moves past a message that is not durably archived, and a
worker killed at any point leaves a cursor from which the next one resumes.
"""

from __future__ import annotations

import errno
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy import Update, select, update
from sqlalchemy.dialects.postgresql import insert

from ingestion_grpc.archive.blobstore import sha256_hex
from ingestion_grpc.archive.catalog import BatchOutcome, record_batch
from ingestion_grpc.db.models import (
    IngestionSource,
    MailboxCursor,
    RunMailbox,
    SyncSession,
    new_id,
)
from ingestion_grpc.db.session import UnitOfWork
from ingestion_grpc.domain.states import RUN_STATUS, RunKind
from ingestion_grpc.engine.context import EngineContext
from ingestion_grpc.engine.read_ahead import ReadAhead
from ingestion_grpc.engine.runs import MailboxState, RunState, finish_if_complete, now
from ingestion_grpc.errors import IngestionError, ProviderAuthError, ProviderDataError
from ingestion_grpc.providers.base import Batch, JsonDict, Provider

log = logging.getLogger(__name__)

# A mailbox hands its place back to the queue after this long, so that one
# huge mailbox cannot hold a worker (or the actor's time limit) for hours.
SLICE_SECONDS = 600.0


@dataclass(frozen=True)
class Claim:
    run_id: str
    mailbox: str
    lease: str
    source_id: str
    kind: RunKind


class Released(Exception):
    """Raised inside the batch loop when the mailbox must stop for now."""


def ingest_mailbox(ctx: EngineContext, run_id: str, mailbox: str, *, final_attempt: bool) -> None:
    claimed = _claim(ctx, run_id, mailbox)
    if claimed is None:
        return
    claim, provider, cursor = claimed
    try:
        _ingest(ctx, claim, provider, cursor)
    except Released:
        pass
    except (ProviderAuthError, ProviderDataError) as error:
        _end(ctx, claim, MailboxState.FAILED, str(error))
    except Exception as error:
        message = _describe(error)
        if final_attempt:
            log.exception("mailbox %s of run %s failed for good", mailbox, run_id)
            _end(ctx, claim, MailboxState.FAILED, f"gave up after retries: {message}")
        else:
            log.warning("mailbox %s of run %s: %s; will retry", mailbox, run_id, message)
            _release(ctx, claim)
            raise
    else:
        _end(ctx, claim, MailboxState.DONE, "")
    finish_if_complete(ctx, run_id)


def _describe(error: Exception) -> str:
    """What a source's status message says about an unexpected error: ours say
    what went wrong; others only their type (their text may hold anything)."""
    if isinstance(error, IngestionError):
        return str(error)
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the archive's storage is full"
    return type(error).__name__


def _claim(
    ctx: EngineContext, run_id: str, mailbox: str
) -> tuple[Claim, Provider, JsonDict | None] | None:
    lease = new_id()
    with ctx.database.unit_of_work() as uow:
        stale_before = now() - ctx.stale_after
        claimed = uow.session.execute(
            update(RunMailbox)
            .where(
                RunMailbox.run_id == run_id,
                RunMailbox.mailbox == mailbox,
                (RunMailbox.state == MailboxState.PENDING)
                | (
                    (RunMailbox.state == MailboxState.RUNNING)
                    & (RunMailbox.heartbeat_at < stale_before)
                ),
            )
            .values(state=MailboxState.RUNNING, lease=lease, heartbeat_at=now())
            .returning(RunMailbox.run_id)
        ).first()
        if claimed is None:
            return None  # done already, or another worker holds it
        run = uow.session.get(SyncSession, run_id)
        source = uow.session.get(IngestionSource, run.source_id) if run else None
        if run is None or source is None:
            return None
        kind = RunKind(run.kind)
        claim = Claim(run_id, mailbox, lease, source.id, kind)
        if source.status != RUN_STATUS[kind]:
            _release_in(uow, claim, pause_run=True)
            uow.commit()
            return None
        stored = uow.session.get(MailboxCursor, (source.id, mailbox))
        if stored is not None and kind is RunKind.IMPORT and stored.updated_at < run.started_at:
            # An import reads everything again (the archive keeps each message
            # once); only checkpoints of this very run, after a pause or a
            # crash, let it skip ahead.
            stored = None
        provider = ctx.provider_for(source)
        uow.commit()
    return claim, provider, stored.cursor if stored else None


def _ingest(ctx: EngineContext, claim: Claim, provider: Provider, cursor: JsonDict | None) -> None:
    started = time.monotonic()
    reader = ReadAhead(provider.fetch(claim.mailbox, cursor), name=f"read {claim.mailbox}")
    with reader as batches, ThreadPoolExecutor(1, thread_name_prefix="blobs") as blob_writer:
        for batch in batches:
            raws = [m.raw for m in batch.messages]
            blobs_stored = blob_writer.submit(ctx.blobs.put_many, raws)
            with ctx.database.unit_of_work() as uow:
                # The rows are written while the blobs are, but committed only
                # once every blob is durable.
                outcome = record_batch(
                    uow, claim.source_id, claim.mailbox, batch.messages, _digests(raws)
                )
                blobs_stored.result()
                source_status = _advance(uow, claim, batch, outcome)
                if source_status != RUN_STATUS[claim.kind]:
                    # Paused (or deleted): this batch is saved; stop here.
                    _release_in(uow, claim, pause_run=True)
                    uow.commit()
                    raise Released
                if time.monotonic() - started > SLICE_SECONDS:
                    _release_in(uow, claim, pause_run=False)
                    uow.after_commit(lambda: ctx.jobs.enqueue_mailbox(claim.run_id, claim.mailbox))
                    uow.commit()
                    raise Released
                uow.commit()


def _digests(raws: list[bytes]) -> list[str]:
    # The blob store names blobs the same way; computing the names here lets the
    # rows be written before the blobs are. The store still hashes on its own
    # (~2 µs a message): a blob's name never rests on what a caller says.
    return [sha256_hex(raw) for raw in raws]


def _advance(uow: UnitOfWork, claim: Claim, batch: Batch, outcome: BatchOutcome) -> str | None:
    """Move the cursor and the counters past a recorded batch; the source's status after.

    Done last in the transaction: these rows are shared with the scheduler and
    the API, so they stay locked only for the moment before COMMIT.
    """
    still_ours = uow.session.execute(
        _held(claim)
        .where(RunMailbox.state == MailboxState.RUNNING)
        .values(heartbeat_at=now())
        .returning(RunMailbox.run_id)
    ).first()
    if still_ours is None:
        log.warning("lost the lease on mailbox %s of run %s", claim.mailbox, claim.run_id)
        raise Released
    uow.session.execute(
        insert(MailboxCursor)
        .values(source_id=claim.source_id, mailbox=claim.mailbox, cursor=batch.cursor)
        .on_conflict_do_update(
            index_elements=["source_id", "mailbox"],
            set_={"cursor": batch.cursor, "updated_at": now()},
        )
    )
    uow.session.execute(
        update(SyncSession)
        .where(SyncSession.id == claim.run_id)
        .values(
            messages_fetched=SyncSession.messages_fetched + len(batch.messages),
            messages_archived=SyncSession.messages_archived + outcome.archived,
            messages_already_present=SyncSession.messages_already_present + outcome.already_present,
            heartbeat_at=now(),
        )
    )
    return uow.session.scalar(
        select(IngestionSource.status).where(IngestionSource.id == claim.source_id)
    )


def _held(claim: Claim) -> Update:
    """An UPDATE of the claimed mailbox row that matches only while the lease holds."""
    return update(RunMailbox).where(
        RunMailbox.run_id == claim.run_id,
        RunMailbox.mailbox == claim.mailbox,
        RunMailbox.lease == claim.lease,
    )


def _release_in(uow: UnitOfWork, claim: Claim, *, pause_run: bool) -> None:
    """Hand the mailbox back (pending) if this worker still holds it."""
    uow.session.execute(
        _held(claim).values(state=MailboxState.PENDING, lease=None, enqueued_at=now())
    )
    if pause_run:
        uow.session.execute(
            update(SyncSession)
            .where(SyncSession.id == claim.run_id, SyncSession.status == RunState.RUNNING)
            .values(status=RunState.PAUSED)
        )


def _release(ctx: EngineContext, claim: Claim) -> None:
    with ctx.database.unit_of_work() as uow:
        _release_in(uow, claim, pause_run=False)
        uow.commit()


def _end(ctx: EngineContext, claim: Claim, state: str, error: str) -> None:
    with ctx.database.unit_of_work() as uow:
        uow.session.execute(
            _held(claim).values(state=state, lease=None, error_message=error, heartbeat_at=now())
        )
        uow.commit()
