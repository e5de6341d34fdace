"""archive.catalog.record_batch against PostgreSQL: one row per distinct bytes of a
mailbox, folder paths merged, counts that say what happened."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ingestion_grpc.archive.blobstore import sha256_hex
from ingestion_grpc.archive.catalog import BatchOutcome, record_batch
from ingestion_grpc.config import Settings
from ingestion_grpc.crypto import CredentialCipher
from ingestion_grpc.db.models import ArchivedEmail
from ingestion_grpc.db.session import Database
from ingestion_grpc.providers.base import FetchedMessage
from ingestion_grpc.server import RunningServer
from tests.support.sources import stored_source

ONE = (
    b"Message-ID: <same@example.com>\r\nSubject: one\r\n"
    b"Date: Thu, 22 Aug 2002 18:26:25 +0700\r\n\r\nfirst\r\n"
)
TWO = b"Message-ID: <same@example.com>\r\nSubject: two \xe2\x9c\x93\r\n\r\nsame Message-ID\r\n"


@pytest.fixture
def database(database_url: str, grpc_server: RunningServer) -> Iterator[Database]:
    """The suite's database (migrated by the server's start)."""
    database = Database(database_url)
    yield database
    database.dispose()


@pytest.fixture
def source_id(database: Database, settings: Settings) -> str:
    return stored_source(
        database, CredentialCipher(settings.encryption_key), "catalog", "importing"
    )


def _record(database: Database, source_id: str, *messages: tuple[bytes, str]) -> BatchOutcome:
    fetched = [
        FetchedMessage(raw, (folder,), f"{folder}:{i}") for i, (raw, folder) in enumerate(messages)
    ]
    with database.unit_of_work() as uow:
        outcome = record_batch(
            uow, source_id, "box", fetched, [sha256_hex(raw) for raw, _ in messages]
        )
        uow.commit()
    return outcome


def _rows(database: Database, source_id: str) -> dict[str, ArchivedEmail]:
    with database.unit_of_work() as uow:
        rows = uow.session.query(ArchivedEmail).filter_by(source_id=source_id).all()
        return {row.subject: row for row in rows}


def test_the_same_bytes_in_two_folders_of_one_batch_are_one_row(
    database: Database, source_id: str
) -> None:
    outcome = _record(database, source_id, (ONE, "INBOX"), (TWO, "INBOX"), (ONE, "Archive/2002"))
    assert outcome == BatchOutcome(
        archived=2, already_present=1, archived_bytes=len(ONE) + len(TWO)
    )
    rows = _rows(database, source_id)
    assert set(rows) == {"one", "two ✓"}  # same Message-ID, different bytes: both kept
    assert rows["one"].folder_paths == ["INBOX", "Archive/2002"]
    assert rows["one"].sha256 == sha256_hex(ONE) and rows["one"].size_bytes == len(ONE)
    assert rows["one"].message_id == "<same@example.com>"
    assert (
        rows["one"].sent_at is not None
        and rows["one"].sent_at.isoformat() == "2002-08-22T11:26:25+00:00"
    )
    assert rows["two ✓"].sent_at is None


def test_a_later_batch_merges_a_new_folder_and_ignores_a_known_one(
    database: Database, source_id: str
) -> None:
    _record(database, source_id, (ONE, "INBOX"))
    assert _record(database, source_id, (ONE, "INBOX")) == BatchOutcome(0, 1)
    assert _record(database, source_id, (ONE, "Sent")) == BatchOutcome(0, 1)
    rows = _rows(database, source_id)
    assert list(rows) == ["one"]
    assert sorted(rows["one"].folder_paths) == ["INBOX", "Sent"]


def test_rows_keep_the_order_the_provider_served(database: Database, source_id: str) -> None:
    messages = [(b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i), "INBOX") for i in range(50)]
    _record(database, source_id, *messages)
    with database.unit_of_work() as uow:
        subjects = [
            row.subject
            for row in uow.session.query(ArchivedEmail)
            .filter_by(source_id=source_id)
            .order_by(ArchivedEmail.archived_at, ArchivedEmail.id)
        ]
    assert subjects == [str(i) for i in range(50)]
