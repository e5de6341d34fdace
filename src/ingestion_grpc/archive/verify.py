"""Re-reading the archive: every blob the catalog names, checked against it.

A blob is read through the `BlobStore` interface only, in chunks, and its SHA-256
(its name) and length compared with the catalog's row. What the catalog names but
the store lacks is missing; what reads back different is damaged. The catalog is
read in pages, ordered by name, so the memory used does not grow with the archive.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, func, select

from ingestion_grpc.archive.blobstore import BlobNotFound, BlobStore
from ingestion_grpc.db.models import ArchivedEmail, IngestionSource
from ingestion_grpc.db.session import Database
from ingestion_grpc.errors import NotFound

CHUNK_BYTES = 1 << 20
PAGE_ROWS = 1000


@dataclass(frozen=True)
class CatalogBlob:
    """A blob as the catalog knows it: its name, its length, how many messages name it."""

    sha256: str
    size_bytes: int
    messages: int


@dataclass(frozen=True)
class BlobProblem:
    blob: CatalogBlob
    kind: str  # "missing" or "damaged"
    detail: str = ""

    def line(self) -> str:
        named_by = f"named by {self.blob.messages} message{'s' if self.blob.messages != 1 else ''}"
        if self.kind == "missing":
            return f"missing: {self.blob.sha256} ({self.blob.size_bytes} bytes, {named_by})"
        return f"damaged: {self.blob.sha256} ({self.detail}; {named_by})"


@dataclass
class Report:
    blobs_checked: int = 0
    bytes_read: int = 0
    problems: list[BlobProblem] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for problem in self.problems if problem.kind == kind)

    def summary(self) -> str:
        return (
            f"checked {self.blobs_checked} blobs ({self.bytes_read} bytes): "
            f"{self.count('missing')} missing, {self.count('damaged')} damaged"
        )


def _catalog_filter(source_id: str | None) -> list[ColumnElement[bool]]:
    return [] if source_id is None else [ArchivedEmail.source_id == source_id]


def check_source(database: Database, source_id: str) -> None:
    """Raise NotFound unless the source exists."""
    with database.unit_of_work() as uow:
        if uow.session.get(IngestionSource, source_id) is None:
            raise NotFound(f"no source with id {source_id}")


def catalog_totals(database: Database, source_id: str | None) -> tuple[int, int]:
    """How many distinct blobs the catalog names (of one source, or all), and their bytes."""
    named = (
        select(ArchivedEmail.sha256, func.max(ArchivedEmail.size_bytes).label("size"))
        .where(*_catalog_filter(source_id))
        .group_by(ArchivedEmail.sha256)
        .subquery()
    )
    with database.unit_of_work() as uow:
        count, total = uow.session.execute(
            select(func.count(), func.coalesce(func.sum(named.c.size), 0))
        ).one()
    return int(count), int(total)


def catalog_blobs(database: Database, source_id: str | None) -> Iterator[CatalogBlob]:
    """Every blob the catalog names, by name; a page of PAGE_ROWS per query (keyset
    paging: no transaction or cursor is held while the blobs are read)."""
    after = ""
    while True:
        query = (
            # One length per name (it is the length of the bytes hashed); max()
            # only picks it from the rows that name the blob.
            select(ArchivedEmail.sha256, func.max(ArchivedEmail.size_bytes), func.count())
            .where(ArchivedEmail.sha256 > after, *_catalog_filter(source_id))
            .group_by(ArchivedEmail.sha256)
            .order_by(ArchivedEmail.sha256)
            .limit(PAGE_ROWS)
        )
        with database.unit_of_work() as uow:
            page = uow.session.execute(query).all()
        for sha256, size_bytes, messages in page:
            yield CatalogBlob(sha256, int(size_bytes), int(messages))
        if len(page) < PAGE_ROWS:
            return
        after = page[-1][0]


def _still_named(database: Database, sha256: str, source_id: str | None) -> bool:
    query = select(ArchivedEmail.id).where(
        ArchivedEmail.sha256 == sha256, *_catalog_filter(source_id)
    )
    with database.unit_of_work() as uow:
        return uow.session.execute(query.limit(1)).first() is not None


def check_blob(store: BlobStore, blob: CatalogBlob) -> tuple[int, BlobProblem | None]:
    """Read the blob whole; the bytes read, and what is wrong with it if anything."""
    digest = hashlib.sha256()
    length = 0
    try:
        reader = store.open(blob.sha256)
    except BlobNotFound:
        return 0, BlobProblem(blob, "missing")
    # Any other error of open (the store is unreachable, access denied) ends the
    # check: it says nothing about this blob.
    try:
        with reader:
            while chunk := reader.read(CHUNK_BYTES):
                digest.update(chunk)
                length += len(chunk)
    except Exception as error:
        # Whatever the store: EIO from a failing disk, S3's checksum check of the
        # body (botocore's FlexibleChecksumError). The bytes cannot be read back.
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        return length, BlobProblem(blob, "damaged", f"cannot be read: {reason}")
    if length != blob.size_bytes or digest.hexdigest() != blob.sha256:
        detail = f"read {length} bytes with SHA-256 {digest.hexdigest()}"
        if length != blob.size_bytes:
            detail += f", the catalog says {blob.size_bytes} bytes"
        return length, BlobProblem(blob, "damaged", detail)
    return length, None


def verify(
    database: Database,
    store: BlobStore,
    source_id: str | None,
    *,
    on_blob: Callable[[Report, BlobProblem | None], None] = lambda report, problem: None,
) -> Report:
    """Check every blob the catalog names (of `source_id`, or of every source);
    `on_blob` is told after each one, with its problem if it has one."""
    if source_id is not None:
        check_source(database, source_id)
    report = Report()
    for blob in catalog_blobs(database, source_id):
        length, problem = check_blob(store, blob)
        if (
            problem is not None
            and problem.kind == "missing"
            and not _still_named(database, blob.sha256, source_id)
        ):
            continue  # deleted with its messages since the page was read: not a loss
        report.blobs_checked += 1
        report.bytes_read += length
        if problem is not None:
            report.problems.append(problem)
        on_blob(report, problem)
    return report
