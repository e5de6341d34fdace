"""Deleting blobs that no archived row names.

Two callers: deleting a source (its blobs that no other source's rows share), and
the periodic orphan sweep, which finds blobs no row names whatever the cause: a
source deleted while one of its batches was storing blobs (the batch's rows then
never commit), a batch that failed after storing its blobs, a crash.

A blob another row references is never deleted, and neither is one a batch in
flight is about to reference: the check for rows and the deletes happen under the
blob lock (`catalog.hold_blobs_for_deleting`). The sweep also leaves blobs
younger than its grace period alone, for writers that do not take the lock (a
worker of an older release during a rolling upgrade).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta

from ingestion_grpc.archive import catalog
from ingestion_grpc.archive.blobstore import BlobStore
from ingestion_grpc.db.session import Database

log = logging.getLogger(__name__)

# Blobs checked (and deleted) per hold of the blob lock: batches wait meanwhile,
# so each hold stays short (a few hundred deletes, even on an object store).
CHUNK = 500
# How old an unreferenced blob must be before the sweep deletes it: far longer
# than any batch takes between storing its blobs and committing its rows.
SWEEP_GRACE = timedelta(hours=1)
# How often a scheduler sweeps: listing a large bucket is not free.
SWEEP_EVERY_SECONDS = 6 * 3600.0


def delete_unreferenced(database: Database, blobs: BlobStore, digests: Iterable[str]) -> int:
    """Delete those of `digests` that no archived row names; return how many went."""
    deleted = 0
    for chunk in _chunks(digests, CHUNK):
        with database.unit_of_work() as uow:
            catalog.hold_blobs_for_deleting(uow)
            orphans = catalog.unreferenced(uow, set(chunk))
            for digest in sorted(orphans):
                blobs.delete(digest)
            deleted += len(orphans)
            uow.commit()  # releases the lock
    return deleted


def sweep_orphans(
    database: Database,
    blobs: BlobStore,
    *,
    grace: timedelta = SWEEP_GRACE,
    now: datetime | None = None,
) -> int:
    """Delete every blob older than `grace` that no archived row names."""
    cutoff = (now or datetime.now(UTC)) - grace
    old = (name for name, modified in blobs.listing() if modified < cutoff)
    deleted = delete_unreferenced(database, blobs, old)
    if deleted:
        log.info("orphan sweep: deleted %d blobs no archived email names", deleted)
    return deleted


class PeriodicSweep:
    """Runs `sweep_orphans` at most every `every_seconds` (the first time at once)."""

    def __init__(self, every_seconds: float = SWEEP_EVERY_SECONDS) -> None:
        self._every = every_seconds
        self._next = time.monotonic()

    def run_if_due(self, database: Database, blobs: BlobStore) -> None:
        if time.monotonic() < self._next:
            return
        # Scheduled before it runs: a failing sweep is not retried every tick.
        self._next = time.monotonic() + self._every
        sweep_orphans(database, blobs)


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
