"""archive.sweep against PostgreSQL and both blob stores: blobs a source deleted in
the middle of a batch leaves behind are swept once past the grace period; a blob
another source's row names survives, and so does one a batch in flight is about
to name (the sweep waits for it)."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, text

from ingestion_grpc.archive.blobstore import BlobStore, LocalBlobStore
from ingestion_grpc.archive.catalog import hold_blobs_for_batch, record_batch
from ingestion_grpc.archive.sweep import PeriodicSweep, delete_unreferenced, sweep_orphans
from ingestion_grpc.db.models import IngestionSource, User
from ingestion_grpc.db.session import Database
from ingestion_grpc.providers.base import FetchedMessage
from ingestion_grpc.server import RunningServer
from tests.support.polling import wait_for
from tests.support.s3 import S3Archive

HOUR = timedelta(hours=1)


@pytest.fixture
def database(database_url: str, grpc_server: RunningServer) -> Iterator[Database]:
    """The suite's database (migrated by the server's start)."""
    database = Database(database_url)
    yield database
    database.dispose()


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    archive: S3Archive = request.getfixturevalue("s3_archive")
    return archive.store()


def _new_source(database: Database) -> str:
    with database.unit_of_work() as uow:
        owner = User(
            email=f"sweep-{uuid.uuid4().hex[:8]}@example.com", password_hash="-", role="user"
        )
        uow.session.add(owner)
        uow.session.flush()
        source = IngestionSource(
            owner_id=owner.id,
            name="sweep",
            provider="mbox_import",
            status="paused",
            sealed_config=b"",
        )
        uow.session.add(source)
        uow.commit()
        return source.id


def _message(text: str) -> bytes:
    # Unique bytes: no other test's rows may name these blobs.
    return f"Subject: {text} {uuid.uuid4().hex}\r\n\r\n{text}\r\n".encode()


def _archive(database: Database, blobs: BlobStore, source_id: str, *raws: bytes) -> list[str]:
    """One batch as the engine writes it: the blobs, then the rows, committed."""
    with database.unit_of_work() as uow:
        hold_blobs_for_batch(uow)
        digests = blobs.put_many(list(raws))
        messages = [FetchedMessage(raw, ("INBOX",), f"id-{i}") for i, raw in enumerate(raws)]
        record_batch(uow, source_id, "INBOX", messages, digests)
        uow.commit()
    return digests


def _stored(blobs: BlobStore) -> set[str]:
    return {name for name, _ in blobs.listing()}


def test_a_source_deleted_mid_batch_leaves_orphans_that_the_sweep_deletes(
    database: Database, store: BlobStore
) -> None:
    doomed, kept = _new_source(database), _new_source(database)
    shared = _message("shared")
    [shared_digest] = _archive(database, store, kept, shared)
    [earlier] = _archive(database, store, doomed, _message("an earlier batch"))
    # The doomed source's batch in flight has stored its blobs (the shared one was
    # there already) but will never commit its rows: the source is deleted first,
    # and its delete only knows the rows committed until then.
    in_flight = store.put_many([_message("in flight 1"), _message("in flight 2"), shared])
    with database.unit_of_work() as uow:
        uow.session.execute(delete(IngestionSource).where(IngestionSource.id == doomed))
        uow.commit()
    assert delete_unreferenced(database, store, [earlier]) == 1
    orphans = set(in_flight) - {shared_digest}
    assert _stored(store) == orphans | {shared_digest}

    # Young orphans stay: a batch may still be about to commit rows naming them.
    assert sweep_orphans(database, store) == 0
    assert _stored(store) == orphans | {shared_digest}

    assert sweep_orphans(database, store, now=datetime.now(UTC) + 2 * HOUR) == 2
    assert _stored(store) == {shared_digest}
    assert store.read(shared_digest) == shared


def test_the_sweep_waits_for_a_batch_in_flight_and_keeps_its_blobs(
    database: Database, store: BlobStore
) -> None:
    source = _new_source(database)
    raw = _message("in flight")
    outcome: list[int] = []
    with database.unit_of_work() as batch:
        hold_blobs_for_batch(batch)
        digests = store.put_many([raw])
        sweeper = threading.Thread(
            target=lambda: outcome.append(
                sweep_orphans(database, store, now=datetime.now(UTC) + 2 * HOUR)
            )
        )
        sweeper.start()
        wait_for(
            lambda: _waiting_for_advisory_lock(database),
            lambda waiting: waiting,
            timeout=30,
            what="the sweep to wait for the batch's blob lock",
        )
        record_batch(batch, source, "INBOX", [FetchedMessage(raw, ("INBOX",), "id")], digests)
        batch.commit()
    sweeper.join(30)
    assert outcome == [0]
    assert store.read(digests[0]) == raw


def _waiting_for_advisory_lock(database: Database) -> bool:
    with database.unit_of_work() as uow:
        waiting = uow.session.scalar(
            text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        )
    return bool(waiting)


def test_the_scheduler_sweeps_at_its_start_then_every_period(
    database: Database, tmp_path: Path
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    sweep = PeriodicSweep(every_seconds=3600)

    def old_orphan() -> str:
        [digest] = store.put_many([_message("orphan")])
        two_hours_ago = (datetime.now(UTC) - 2 * HOUR).timestamp()
        os.utime(store.path(digest), (two_hours_ago, two_hours_ago))
        return digest

    first = old_orphan()
    young = store.put(_message("young orphan"))
    sweep.run_if_due(database, store)
    assert _stored(store) == {young}
    second = old_orphan()
    sweep.run_if_due(database, store)  # not due for an hour
    assert _stored(store) == {young, second}
    assert first not in _stored(store)
