"""Reading the archive back, with the same visibility rules as sources."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ingestion_grpc.archive import catalog
from ingestion_grpc.archive.blobstore import BlobStore
from ingestion_grpc.auth.permissions import Principal
from ingestion_grpc.db.models import ArchivedEmail, IngestionSource
from ingestion_grpc.db.session import UnitOfWork
from ingestion_grpc.domain import audit
from ingestion_grpc.domain.paging import decode_token, encode_token, page_size
from ingestion_grpc.errors import NotFound

RAW_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ArchivePage:
    emails: list[ArchivedEmail]
    next_page_token: str
    total_size: int


def _visible(principal: Principal, source: IngestionSource | None) -> bool:
    return source is not None and (
        principal.sees_all_sources or source.owner_id == principal.user_id
    )


def list_archived(
    uow: UnitOfWork, principal: Principal, source_id: str, size: int, token: str
) -> ArchivePage:
    if not _visible(principal, uow.session.get(IngestionSource, source_id)):
        raise NotFound(f"Ingestion source {source_id} not found.")
    limit = page_size(size, default=100, maximum=1000)
    emails = catalog.page_for_source(uow, source_id, decode_token(token), limit + 1)
    next_token = ""
    if len(emails) > limit:
        emails = emails[:limit]
        next_token = encode_token(emails[-1].archived_at, emails[-1].id)
    return ArchivePage(emails, next_token, catalog.count_for_source(uow, source_id))


def get_archived(uow: UnitOfWork, principal: Principal, email_id: str) -> ArchivedEmail:
    email = uow.session.get(ArchivedEmail, email_id)
    if email is None or not _visible(principal, uow.session.get(IngestionSource, email.source_id)):
        raise NotFound(f"Archived email {email_id} not found.")
    return email


def get_for_download(uow: UnitOfWork, principal: Principal, email_id: str) -> ArchivedEmail:
    """The message whose raw bytes the caller is about to read; the download is
    recorded in the audit trail (the caller commits before sending a byte)."""
    email = get_archived(uow, principal, email_id)
    audit.record(
        uow,
        principal,
        audit.Action.ARCHIVED_EMAIL_DOWNLOAD,
        audit.Target.ARCHIVED_EMAIL,
        email.id,
        source_id=email.source_id,
        details={"sha256": email.sha256, "sizeBytes": email.size_bytes},
    )
    return email


def read_raw(blobs: BlobStore, email: ArchivedEmail) -> Iterator[bytes]:
    with blobs.open(email.sha256) as stream:
        while chunk := stream.read(RAW_CHUNK_BYTES):
            yield chunk
