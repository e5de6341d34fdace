"""One mailbox of a run: fetch, store the bytes, record them, move the cursor.

Per batch, one transaction: the metadata rows (and the folder paths of messages
the provider only saw again), then (once the batch's blobs are durable) a check
that this worker still holds the mailbox's lease, the new cursor, the counters of
the mailbox and of the run, and the heartbeat, then COMMIT. The blobs are written
in a thread while the rows are inserted, and the next batch is read from the
provider while this one is stored (`read_ahead`), but nothing commits before its
bytes are durable: the cursor never moves past a message that is not durably
archived, and a worker killed at any point leaves a cursor from which the next
one resumes.

Between batches, and during one that takes long, `MailboxHeartbeat` reports the
mailbox alive (`engine/heartbeat.py`), so a slow batch never looks like a dead
worker.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert

from ingestion_grpc.archive.blobstore import sha256_hex
from ingestion_grpc.archive.catalog import (
    BatchOutcome,
    add_folders,
    archived_ids,
    hold_blobs_for_batch,
    record_batch,
)
from ingestion_grpc.db.models import IngestionSource, MailboxCursor, RunMailbox, SyncSession
from ingestion_grpc.db.session import Database, UnitOfWork, ping
from ingestion_grpc.domain import lifecycle
from ingestion_grpc.domain.lifecycle import RUN_STATUS, MailboxClaim, MailboxState, RunKind
from ingestion_grpc.engine.context import EngineContext
from ingestion_grpc.engine.heartbeat import MailboxHeartbeat
from ingestion_grpc.engine.read_ahead import ReadAhead
from ingestion_grpc.engine.runs import finish_if_complete
from ingestion_grpc.errors import (
    DatabaseUnavailable,
    IngestionError,
    MailboxUnavailable,
    ProviderAuthError,
    ProviderDataError,
)
from ingestion_grpc.providers.base import Batch, FetchContext, JsonDict, Mailbox, Provider
from ingestion_grpc.telemetry import context, metrics

log = logging.getLogger(__name__)

# A mailbox hands its place back to the queue after this long, so that one
# huge mailbox cannot hold a worker (or the actor's time limit) for hours.
SLICE_SECONDS = 600.0
# How often a worker whose database went away asks whether it is back.
DATABASE_POLL_SECONDS = 0.5


class Released(Exception):
    """Raised inside the batch loop when the mailbox must stop for now; `outcome`
    says why (`paused`, `requeued`, `lost_lease`), for the metrics."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


class StaleKnownMessages(Exception):
    """Raised when a provider reports as known messages the archive does not hold:
    the batch is not committed, and the retry asks the archive again."""


@dataclass(frozen=True)
class MailboxArchive:
    """`ArchiveLookup` for one mailbox: what its archive holds, by provider id."""

    database: Database
    source_id: str
    mailbox: str

    def archived_ids(self, provider_message_ids: Collection[str]) -> set[str]:
        with self.database.unit_of_work() as uow:
            return archived_ids(uow, self.source_id, self.mailbox, provider_message_ids)


def ingest_mailbox(ctx: EngineContext, run_id: str, mailbox: str, *, final_attempt: bool) -> None:
    with context.bound(run_id=run_id, mailbox=mailbox):
        claimed = _claim(ctx, run_id, mailbox)
        if claimed is None:
            return
        claim, provider, cursor = claimed
        with context.bound(source_id=claim.source_id, provider=provider.name):
            _ingest_claimed(ctx, claim, provider, cursor, final_attempt=final_attempt)


def _ingest_claimed(
    ctx: EngineContext,
    claim: MailboxClaim,
    provider: Provider,
    cursor: JsonDict | None,
    *,
    final_attempt: bool,
) -> None:
    run_id, mailbox = claim.run_id, claim.mailbox
    started = time.monotonic()
    outcome = "retry"
    try:
        with MailboxHeartbeat(ctx.database, claim, ctx.stale_after) as heartbeat:
            _ingest(ctx, claim, provider, cursor, heartbeat)
    except Released as released:
        outcome = released.outcome
    except DatabaseUnavailable:
        # Not the mailbox's fault, and this worker is fine: hand the mailbox back
        # (and send it again) as soon as the database answers, rather than
        # leaving it held until STALE_RUN_AFTER tells the watchdog it is lost.
        log.warning("mailbox %s of run %s: the database went away; released", mailbox, run_id)
        outcome = "requeued"
        _release(ctx, claim, requeue=True)
        return
    except MailboxUnavailable as error:
        log.info("mailbox %s of run %s skipped: %s", claim.display_name, run_id, error)
        outcome = "skipped"
        _end(ctx, claim, MailboxState.SKIPPED, str(error))
    except (ProviderAuthError, ProviderDataError) as error:
        outcome = "failed"
        _end(ctx, claim, MailboxState.FAILED, str(error))
    except Exception as error:
        message = _describe(error)
        if final_attempt:
            log.exception("mailbox %s of run %s failed for good", mailbox, run_id)
            outcome = "failed"
            _end(ctx, claim, MailboxState.FAILED, f"gave up after retries: {message}")
        else:
            log.warning("mailbox %s of run %s: %s; will retry", mailbox, run_id, message)
            _release(ctx, claim, requeue=False, reason=f"{message}; will retry")
            raise
    else:
        outcome = "done"
        _end(ctx, claim, MailboxState.DONE, "")
    finally:
        metrics.MAILBOX_RUNS.labels(provider.name, outcome).observe(time.monotonic() - started)
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
) -> tuple[MailboxClaim, Provider, JsonDict | None] | None:
    with ctx.database.unit_of_work() as uow:
        claim = lifecycle.claim_mailbox(uow, run_id, mailbox, ctx.stale_after)
        if claim is None:
            uow.commit()
            return None
        source = uow.session.get(IngestionSource, claim.source_id)
        assert source is not None
        stored = uow.session.get(MailboxCursor, (source.id, mailbox))
        if (
            stored is not None
            and claim.kind is RunKind.IMPORT
            and stored.updated_at < claim.run_started_at
        ):
            # An import reads everything again (the archive keeps each message
            # once, and providers skip downloads of what it holds); only
            # checkpoints of this very run, after a pause or a crash, let it
            # skip ahead.
            stored = None
        provider = ctx.provider_for(source)
        uow.commit()
    return claim, provider, stored.cursor if stored else None


def _ingest(
    ctx: EngineContext,
    claim: MailboxClaim,
    provider: Provider,
    cursor: JsonDict | None,
    heartbeat: MailboxHeartbeat,
) -> None:
    started = time.monotonic()
    context = FetchContext(
        archive=MailboxArchive(ctx.database, claim.source_id, claim.mailbox), limits=ctx.limits
    )
    fetch = provider.fetch(Mailbox(claim.mailbox, claim.display_name), cursor, context)
    reader = ReadAhead(fetch, name=f"read {claim.mailbox}")
    with reader as batches, ThreadPoolExecutor(1, thread_name_prefix="blobs") as blob_writer:
        for batch in batches:
            if heartbeat.lost:
                # Another worker holds the mailbox now: store nothing more of it.
                raise Released("lost_lease")
            raws = [m.raw for m in batch.messages]
            stop: str | None = None
            with ctx.database.unit_of_work() as uow:
                # No blob is deleted from here to the commit (archive/sweep.py).
                hold_blobs_for_batch(uow)
                blobs_stored = blob_writer.submit(ctx.blobs.put_many, raws) if raws else None
                # The rows are written while the blobs are, but committed only
                # once every blob is durable.
                outcome = record_batch(
                    uow, claim.source_id, claim.mailbox, batch.messages, _digests(raws)
                )
                seen_again = _merge_known(uow, claim, batch)
                if blobs_stored is not None:
                    blobs_stored.result()
                counts = BatchCounts.of(batch, outcome, seen_again)
                source_status = _advance(uow, claim, batch.cursor, counts)
                if source_status != RUN_STATUS[claim.kind]:
                    # Paused (or deleted): this batch is saved; stop here.
                    lifecycle.release_mailbox(uow, claim, pause_run=True)
                    stop = "paused"
                elif time.monotonic() - started > SLICE_SECONDS:
                    lifecycle.release_mailbox(uow, claim, pause_run=False, requeue=ctx.jobs)
                    stop = "requeued"
                uow.commit()
            # Counted once committed, so the metrics never run ahead of the archive.
            counts.count(provider.name)
            heartbeat.batch_committed()
            if stop is not None:
                heartbeat.stop()
                raise Released(stop)


@dataclass(frozen=True)
class BatchCounts:
    """What one batch adds to the counters of its mailbox, its run and the metrics."""

    fetched: int
    archived: int
    already_present: int
    skipped: int
    failed: int
    archived_bytes: int

    @classmethod
    def of(cls, batch: Batch, outcome: BatchOutcome, seen_again: int) -> BatchCounts:
        return cls(
            fetched=len(batch.messages),
            archived=outcome.archived,
            already_present=outcome.already_present + seen_again,
            skipped=len(batch.skipped),
            failed=len(batch.failed),
            archived_bytes=outcome.archived_bytes,
        )

    def count(self, provider: str) -> None:
        metrics.count_batch(
            provider,
            fetched=self.fetched,
            archived=self.archived,
            already_present=self.already_present,
            skipped=self.skipped,
            failed=self.failed,
            archived_bytes=self.archived_bytes,
        )


def _digests(raws: list[bytes]) -> list[str]:
    # The blob store names blobs the same way; computing the names here lets the
    # rows be written before the blobs are. The store still hashes on its own
    # (~2 µs a message): a blob's name never rests on what a caller says.
    return [sha256_hex(raw) for raw in raws]


def _merge_known(uow: UnitOfWork, claim: MailboxClaim, batch: Batch) -> int:
    """Add the folder paths of messages seen again; how many there were."""
    if not batch.known:
        return 0
    folders = [(k.provider_message_id, k.folder_paths) for k in batch.known]
    found = add_folders(uow, claim.source_id, claim.mailbox, folders)
    missing = {k.provider_message_id for k in batch.known} - found
    if missing:
        # Never move the cursor past a message that is in no archive.
        raise StaleKnownMessages(
            f"{len(missing)} message(s) reported as archived are not in the archive"
        )
    return len(batch.known)


def _advance(
    uow: UnitOfWork, claim: MailboxClaim, cursor: JsonDict, counts: BatchCounts
) -> str | None:
    """Move the cursor and the counters past a recorded batch; the source's status after.

    Done last in the transaction: these rows are shared with the scheduler and
    the API, so they stay locked only for the moment before COMMIT.
    """
    still_ours = uow.session.execute(
        lifecycle.held(claim)
        .where(RunMailbox.state == MailboxState.RUNNING)
        .values(
            heartbeat_at=lifecycle.now(),
            updated_at=lifecycle.now(),
            messages_fetched=RunMailbox.messages_fetched + counts.fetched,
            messages_archived=RunMailbox.messages_archived + counts.archived,
            messages_already_present=RunMailbox.messages_already_present + counts.already_present,
            messages_skipped=RunMailbox.messages_skipped + counts.skipped,
            messages_failed=RunMailbox.messages_failed + counts.failed,
        )
        .returning(RunMailbox.run_id)
    ).first()
    if still_ours is None:
        log.warning("lost the lease on mailbox %s of run %s", claim.mailbox, claim.run_id)
        raise Released("lost_lease")
    uow.session.execute(
        insert(MailboxCursor)
        .values(
            source_id=claim.source_id,
            mailbox=claim.mailbox,
            cursor=cursor,
            updated_at=lifecycle.now(),
        )
        .on_conflict_do_update(
            index_elements=["source_id", "mailbox"],
            set_={"cursor": cursor, "updated_at": lifecycle.now()},
        )
    )
    uow.session.execute(
        update(SyncSession)
        .where(SyncSession.id == claim.run_id)
        .values(
            messages_fetched=SyncSession.messages_fetched + counts.fetched,
            messages_archived=SyncSession.messages_archived + counts.archived,
            messages_already_present=SyncSession.messages_already_present + counts.already_present,
            messages_skipped=SyncSession.messages_skipped + counts.skipped,
            messages_failed=SyncSession.messages_failed + counts.failed,
            heartbeat_at=lifecycle.now(),
        )
    )
    return uow.session.scalar(
        select(IngestionSource.status).where(IngestionSource.id == claim.source_id)
    )


def _end(ctx: EngineContext, claim: MailboxClaim, state: MailboxState, reason: str) -> None:
    def end() -> None:
        with ctx.database.unit_of_work() as uow:
            lifecycle.end_mailbox(uow, claim, state, reason, ctx.jobs)
            uow.commit()

    _once_the_database_answers(ctx, end)


def _release(
    ctx: EngineContext, claim: MailboxClaim, *, requeue: bool, reason: str | None = None
) -> None:
    def release() -> None:
        with ctx.database.unit_of_work() as uow:
            lifecycle.release_mailbox(
                uow, claim, pause_run=False, requeue=ctx.jobs if requeue else None, reason=reason
            )
            uow.commit()

    _once_the_database_answers(ctx, release)


def _once_the_database_answers(ctx: EngineContext, action: Callable[[], None]) -> None:
    """`action()`; if the database cannot be reached, again once it answers.

    Both the mailbox's end and its hand-back only change rows this worker's
    lease holds, so doing one twice is harmless. Waits at most STALE_RUN_AFTER:
    past that the watchdog takes the mailbox over anyway.
    """
    try:
        action()
        return
    except DatabaseUnavailable:
        deadline = time.monotonic() + ctx.stale_after.total_seconds()
        while not _answers(ctx.database):
            if time.monotonic() > deadline:
                raise
            time.sleep(DATABASE_POLL_SECONDS)
    action()


def _answers(database: Database) -> bool:
    try:
        ping(database.engine)
    except DatabaseUnavailable:
        return False
    return True
