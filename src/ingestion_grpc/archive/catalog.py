"""The archive's metadata rows: writing a batch exactly once, reading it back.

Exactly-once is the unique constraint (source, mailbox, sha256), not a
pre-check: two workers racing on the same message both insert, and one of
them turns into "already present".
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import func, select, text, tuple_

from ingestion_grpc.archive.metadata import parse_metadata
from ingestion_grpc.db.models import ArchivedEmail, utcnow
from ingestion_grpc.db.session import UnitOfWork


class ArchivableMessage(Protocol):
    """A message to archive, as the engine hands it over (a provider's FetchedMessage)."""

    @property
    def raw(self) -> bytes: ...

    @property
    def folder_paths(self) -> Sequence[str]: ...

    @property
    def provider_message_id(self) -> str: ...


# A whole batch travels as ONE jsonb parameter: binding 500 rows x 14 parameters
# (an executemany) cost the client more than PostgreSQL spent on the INSERT.
# A row whose bytes this mailbox already holds gets the folder path merged in; a
# row already listing the folder is left alone and returns nothing, so a re-import
# writes nothing. `xmax = 0` tells a new row from a merged one.
_INSERT_OR_ADD_FOLDER = text(
    """
    INSERT INTO archived_emails (
        id, source_id, mailbox, folder_paths, provider_message_id, sha256, size_bytes,
        message_id, subject, from_address, to_addresses, cc_addresses, sent_at,
        has_attachments, archived_at)
    SELECT
        gen_random_uuid()::text, :source_id, :mailbox, r.folder_paths,
        r.provider_message_id, r.sha256, r.size_bytes, r.message_id, r.subject,
        r.from_address, r.to_addresses, r.cc_addresses, r.sent_at, r.has_attachments,
        r.archived_at
    FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(
        folder_paths text[], provider_message_id text, sha256 text, size_bytes bigint,
        message_id text, subject text, from_address text, to_addresses text[],
        cc_addresses text[], sent_at timestamptz, has_attachments boolean,
        archived_at timestamptz)
    ON CONFLICT ON CONSTRAINT uq_archived_emails_content DO UPDATE
        SET folder_paths = ARRAY(
            SELECT DISTINCT unnest(archived_emails.folder_paths || excluded.folder_paths)
            ORDER BY 1)
        WHERE NOT archived_emails.folder_paths @> excluded.folder_paths
    RETURNING xmax = 0, size_bytes
    """
)


@dataclass(frozen=True)
class BatchOutcome:
    archived: int
    already_present: int
    # Bytes of the newly archived messages.
    archived_bytes: int = 0


def record_batch(
    uow: UnitOfWork,
    source_id: str,
    mailbox: str,
    messages: Sequence[ArchivableMessage],
    digests: Sequence[str],
) -> BatchOutcome:
    """Insert a row per new message; for known bytes, add the folder paths."""
    rows: dict[str, dict[str, object]] = {}
    batch_started = utcnow()
    for message, digest in zip(messages, digests, strict=True):
        row = rows.get(digest)
        if row is not None:
            folders = row["folder_paths"]
            assert isinstance(folders, list)
            folders.extend(p for p in message.folder_paths if p not in folders)
            continue
        meta = parse_metadata(message.raw)
        rows[digest] = {
            "folder_paths": list(dict.fromkeys(message.folder_paths)),
            "provider_message_id": message.provider_message_id,
            "sha256": digest,
            "size_bytes": len(message.raw),
            "message_id": meta.message_id,
            "subject": meta.subject,
            "from_address": meta.from_,
            "to_addresses": meta.to,
            "cc_addresses": meta.cc,
            "sent_at": meta.sent_at.isoformat() if meta.sent_at else None,
            "has_attachments": meta.has_attachments,
            # A microsecond apart, so that listing the archive (oldest first)
            # keeps the order the provider served.
            "archived_at": (batch_started + timedelta(microseconds=len(rows))).isoformat(),
        }
    if not rows:
        return BatchOutcome(0, 0)
    results = uow.session.execute(
        _INSERT_OR_ADD_FOLDER,
        {
            "source_id": source_id,
            "mailbox": mailbox,
            "rows": json.dumps(list(rows.values()), ensure_ascii=False),
        },
    )
    new_sizes = [size for is_new, size in results if is_new]
    return BatchOutcome(
        archived=len(new_sizes),
        already_present=len(messages) - len(new_sizes),
        archived_bytes=sum(new_sizes),
    )


# Folder paths merged into rows found by the provider's id, for messages a provider
# saw again without downloading them; returns the ids it found.
_ADD_FOLDERS = text(
    """
    UPDATE archived_emails AS a
    SET folder_paths = ARRAY(SELECT DISTINCT unnest(a.folder_paths || r.folder_paths) ORDER BY 1)
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
        AS r(provider_message_id text, folder_paths text[])
    WHERE a.source_id = :source_id AND a.mailbox = :mailbox
      AND a.provider_message_id = r.provider_message_id
    RETURNING a.provider_message_id
    """
)


def add_folders(
    uow: UnitOfWork, source_id: str, mailbox: str, folders: Sequence[tuple[str, Sequence[str]]]
) -> set[str]:
    """Merge `(provider_message_id, folder_paths)` into archived rows; the ids found."""
    merged: dict[str, list[str]] = {}
    for message_id, paths in folders:
        merged.setdefault(message_id, []).extend(paths)
    if not merged:
        return set()
    rows = [{"provider_message_id": k, "folder_paths": v} for k, v in merged.items()]
    result = uow.session.execute(
        _ADD_FOLDERS,
        {"source_id": source_id, "mailbox": mailbox, "rows": json.dumps(rows, ensure_ascii=False)},
    )
    return {found for (found,) in result}


def archived_ids(
    uow: UnitOfWork, source_id: str, mailbox: str, provider_message_ids: Collection[str]
) -> set[str]:
    """Those of `provider_message_ids` that the mailbox's archive holds."""
    if not provider_message_ids:
        return set()
    return set(
        uow.session.scalars(
            select(ArchivedEmail.provider_message_id).where(
                ArchivedEmail.source_id == source_id,
                ArchivedEmail.mailbox == mailbox,
                ArchivedEmail.provider_message_id.in_(list(provider_message_ids)),
            )
        )
    )


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


# The blob lock, a PostgreSQL advisory lock: a batch stores its blobs (skipping
# those already stored) before it commits the rows naming them, so a blob with no
# row may be one an uncommitted batch relies on. Batches hold the lock shared
# from before they store blobs until they commit; whoever deletes blobs holds it
# exclusively while it looks for rows and deletes, and so sees each such batch
# either committed or not yet started (that one then stores the blob again).
_BLOB_LOCK = 7_401_224


def hold_blobs_for_batch(uow: UnitOfWork) -> None:
    """Take the blob lock shared, until the transaction ends: before storing a batch's blobs."""
    uow.session.execute(text("SELECT pg_advisory_xact_lock_shared(:key)"), {"key": _BLOB_LOCK})


def hold_blobs_for_deleting(uow: UnitOfWork) -> None:
    """Take the blob lock exclusively, until the transaction ends: waits for the
    batches in flight to commit, and holds new ones back."""
    uow.session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _BLOB_LOCK})
