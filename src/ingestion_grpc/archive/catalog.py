"""The archive's metadata rows: writing a batch exactly once, reading it back.

Exactly-once is the unique constraint (source, mailbox, sha256), not a
pre-check: two workers racing on the same message both insert, and one of
them turns into "already present".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, literal_column, select, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.sql.dml import ReturningInsert
from sqlalchemy.sql.elements import ColumnClause

from ingestion_grpc.archive.metadata import parse_metadata
from ingestion_grpc.db.models import ArchivedEmail, new_id
from ingestion_grpc.db.session import UnitOfWork
from ingestion_grpc.providers.base import FetchedMessage

_MERGED_FOLDERS: ColumnClause[Any] = literal_column(
    "ARRAY(SELECT DISTINCT unnest(archived_emails.folder_paths || excluded.folder_paths) "
    "ORDER BY 1)"
)


def _insert_or_add_folder() -> ReturningInsert[tuple[bool]]:
    """Insert a row; on known bytes, merge the folder path in. Returns whether
    the row is new (`xmax = 0`); a row already listing the folder is untouched
    and returns nothing, so a re-import writes nothing."""
    statement = insert(ArchivedEmail)
    return statement.on_conflict_do_update(
        constraint="uq_archived_emails_content",
        set_={"folder_paths": _MERGED_FOLDERS},
        where=~ArchivedEmail.folder_paths.contains(statement.excluded.folder_paths),
    ).returning(literal_column("xmax = 0"))


_INSERT_OR_ADD_FOLDER = _insert_or_add_folder()


@dataclass(frozen=True)
class BatchOutcome:
    archived: int
    already_present: int


def record_batch(
    uow: UnitOfWork,
    source_id: str,
    mailbox: str,
    messages: Sequence[FetchedMessage],
    digests: Sequence[str],
) -> BatchOutcome:
    """Insert a row per new message; for known bytes, add the folder path."""
    rows: dict[str, dict[str, object]] = {}
    for message, digest in zip(messages, digests, strict=True):
        row = rows.get(digest)
        if row is not None:
            folders = row["folder_paths"]
            assert isinstance(folders, list)
            if message.folder_path not in folders:
                folders.append(message.folder_path)
            continue
        meta = parse_metadata(message.raw)
        rows[digest] = {
            "source_id": source_id,
            "mailbox": mailbox,
            "folder_paths": [message.folder_path],
            "provider_message_id": message.provider_message_id,
            "sha256": digest,
            "size_bytes": len(message.raw),
            "message_id": meta.message_id,
            "subject": meta.subject,
            "from_address": meta.from_,
            "to_addresses": meta.to,
            "cc_addresses": meta.cc,
            "sent_at": meta.sent_at,
            "has_attachments": meta.has_attachments,
        }
    if not rows:
        return BatchOutcome(0, 0)
    # One cached statement, sent as an executemany (SQLAlchemy batches it into
    # multi-row INSERTs): compiling a fresh 500-row statement per batch cost
    # more than PostgreSQL's work.
    results = uow.session.execute(
        _INSERT_OR_ADD_FOLDER, [{"id": new_id(), **row} for row in rows.values()]
    )
    inserted = sum(1 for (is_new,) in results if is_new)
    return BatchOutcome(archived=inserted, already_present=len(messages) - inserted)


def count_for_source(uow: UnitOfWork, source_id: str) -> int:
    return (
        uow.session.scalar(
            select(func.count())
            .select_from(ArchivedEmail)
            .where(ArchivedEmail.source_id == source_id)
        )
        or 0
    )


def page_for_source(
    uow: UnitOfWork, source_id: str, after: tuple[datetime, str] | None, limit: int
) -> list[ArchivedEmail]:
    """Oldest first, keyset-paginated on (archived_at, id)."""
    query = select(ArchivedEmail).where(ArchivedEmail.source_id == source_id)
    if after is not None:
        query = query.where(tuple_(ArchivedEmail.archived_at, ArchivedEmail.id) > tuple_(*after))
    query = query.order_by(ArchivedEmail.archived_at, ArchivedEmail.id).limit(limit)
    return list(uow.session.scalars(query))


def digests_of_source(uow: UnitOfWork, source_id: str) -> set[str]:
    return set(
        uow.session.scalars(
            select(ArchivedEmail.sha256).where(ArchivedEmail.source_id == source_id).distinct()
        )
    )


def unreferenced(uow: UnitOfWork, digests: set[str]) -> set[str]:
    """The digests no archived row refers to any more."""
    if not digests:
        return set()
    referenced = set(
        uow.session.scalars(
            select(ArchivedEmail.sha256).where(ArchivedEmail.sha256.in_(digests)).distinct()
        )
    )
    return digests - referenced
