"""Uploaded files: received piece by piece, kept under UPLOAD_ROOT only once whole,
owned by their uploader, used by one source at most, removed when left unused.

An upload is written to a hidden `.<uuid>.partial` file next to its final
place, fsynced, then renamed to `<uuid>.upload` (and the folder fsynced), so a
`.upload` file is always complete and durable. Names are always the server's
own: nothing a client sends ends up in a path. Whatever stops an upload early
(the size limit, a client that disconnects, a full disk) deletes its partial
file.

Each complete upload has a row (`uploads`) naming its owner. Only the owner, or
an admin, can create a source from it (anyone else is told it does not exist),
and only one source ever: the claim is permanent, so a second source naming it
is refused with Conflict. An upload no source uses, or whose row was never
written (a crash between the file and the row), is removed after UPLOAD_TTL by
`remove_expired`, which the scheduler runs now and then.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select, update

from ingestion_grpc import errors
from ingestion_grpc.auth.permissions import Principal
from ingestion_grpc.db.models import Upload
from ingestion_grpc.db.session import Database, UnitOfWork
from ingestion_grpc.domain import audit
from ingestion_grpc.providers.base import JsonDict
from ingestion_grpc.providers.files import UPLOAD_SUFFIX, UPLOADED

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"


class UploadTooLarge(errors.IngestionError):
    """Raised when an upload passes the size limit; nothing of it is kept."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"The file is larger than the upload limit of {limit} bytes.")
        self.limit = limit


class UploadAbandoned(errors.IngestionError):
    """Raised when the client went away before the upload was complete."""


@dataclass(frozen=True)
class StoredUpload:
    """A complete upload on disk."""

    file_path: str  # relative to the upload root: "<uuid>.upload"
    size: int

    @property
    def upload_id(self) -> str:
        return self.file_path.removesuffix(UPLOAD_SUFFIX)


class UploadStore:
    """Stores uploads in one folder, each at most `max_bytes` long."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def store(
        self, chunks: Iterable[bytes], *, still_wanted: Callable[[], bool] | None = None
    ) -> StoredUpload:
        """Write `chunks` to a new file and return it once durable.

        Raises UploadTooLarge as soon as the total passes the limit, without
        reading further. `still_wanted()`, asked after the last chunk is on
        disk, lets the caller give up at the last moment (UploadAbandoned); an
        exception from `chunks` itself propagates. In every failure the partial
        file is removed.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        name = str(uuid.uuid4())
        partial = self.root / f".{name}{PARTIAL_SUFFIX}"
        final = self.root / f"{name}{UPLOAD_SUFFIX}"
        size = 0
        try:
            with open(partial, "xb") as handle:
                for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise UploadTooLarge(self.max_bytes)
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            if still_wanted is not None and not still_wanted():
                raise UploadAbandoned("The client went away before the upload was complete.")
            os.rename(partial, final)
            _fsync_folder(self.root)
        except BaseException:
            partial.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            raise
        log.info("stored upload %s (%d bytes)", final.name, size)
        return StoredUpload(file_path=final.name, size=size)

    def remove_stale_partials(self, older_than: timedelta) -> int:
        """Delete partial files left by a server that died mid-upload.

        A live upload writes to its file all the time, so one untouched for
        `older_than` is abandoned. Returns how many were removed.
        """
        if not self.root.is_dir():
            return 0
        cutoff = time.time() - older_than.total_seconds()
        removed = 0
        for path in self.root.glob(f".*{PARTIAL_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        if removed:
            log.info("removed %d abandoned partial upload(s) from %s", removed, self.root)
        return removed


def record_upload(uow: UnitOfWork, principal: Principal, stored: StoredUpload) -> Upload:
    """The row that makes a stored file the caller's upload."""
    upload = Upload(id=stored.upload_id, owner_id=principal.user_id, size_bytes=stored.size)
    uow.session.add(upload)
    audit.record(
        uow,
        principal,
        audit.Action.UPLOAD_CREATE,
        audit.Target.UPLOAD,
        upload.id,
        details={"sizeBytes": stored.size},
    )
    uow.session.flush()
    return upload


def upload_named(
    uow: UnitOfWork, principal: Principal, config: JsonDict, root: Path, source_id: str | None
) -> Upload | None:
    """The upload a file source's config names as `uploadedFilePath`, locked until
    commit; None when it names none.

    NotFound when there is no such upload or it is someone else's (an admin may
    use anyone's): the two are not told apart. Conflict when a source claimed it
    already, unless that is `source_id` itself (an update that keeps it).
    """
    if UPLOADED not in config:
        return None
    given = str(config[UPLOADED])
    field = f"providerConfig.{UPLOADED}"
    written = Path(os.path.normpath(root / given))
    upload = None
    if written.parent == root and written.name.endswith(UPLOAD_SUFFIX):
        upload = uow.session.scalar(
            select(Upload)
            .where(Upload.id == written.name.removesuffix(UPLOAD_SUFFIX))
            .with_for_update()
        )
    if upload is None or not (principal.is_admin or upload.owner_id == principal.user_id):
        raise errors.NotFound(f"{field}: upload {given!r} not found.")
    if upload.claimed_at is not None and (source_id is None or upload.source_id != source_id):
        raise errors.Conflict(
            f"{field}: upload {given!r} was already used for a source; "
            "upload the file again to create another."
        )
    return upload


def attach(uow: UnitOfWork, upload: Upload | None, source_id: str) -> None:
    """Make `upload` the one the source uses (None: it uses none any more)."""
    uow.session.execute(
        update(Upload)
        .where(Upload.source_id == source_id, Upload.id != (upload.id if upload else ""))
        .values(source_id=None)
    )
    if upload is not None and upload.source_id != source_id:
        upload.source_id = source_id
        upload.claimed_at = func.now()
    uow.session.flush()


def remove_expired(
    database: Database,
    store: UploadStore,
    ttl: timedelta,
    names_in_use: Callable[[], set[str] | None],
) -> int:
    """Delete the uploads no source uses that are older than `ttl`; how many went.

    Rows: unused ones created more than `ttl` ago (by the database's clock),
    each deleted with its file in one transaction. Files without a row (a crash
    between the file and its row, or uploaded before rows existed): those
    untouched for `ttl`, unless a source's config names them (`names_in_use`,
    asked only when there are such files; None, when a config cannot be read,
    keeps them all). Partial files of a server that died
    mid-upload go too. An upload a source uses is never removed.
    """
    removed = 0
    with database.unit_of_work() as uow:
        expired = uow.session.scalars(
            select(Upload)
            .where(Upload.source_id.is_(None), Upload.created_at < func.now() - ttl)
            .with_for_update(skip_locked=True)
        ).all()
        for upload in expired:
            try:
                (store.root / f"{upload.id}{UPLOAD_SUFFIX}").unlink(missing_ok=True)
            except OSError as error:
                log.warning("expired upload %s not removed: %s", upload.id, error.strerror)
                continue
            uow.session.delete(upload)
            removed += 1
        uow.commit()
    removed += _remove_files_without_rows(database, store.root, ttl, names_in_use)
    store.remove_stale_partials(ttl)
    if removed:
        log.info("removed %d expired upload(s) from %s", removed, store.root)
    return removed


def _remove_files_without_rows(
    database: Database, root: Path, ttl: timedelta, names_in_use: Callable[[], set[str] | None]
) -> int:
    if not root.is_dir():
        return 0
    cutoff = time.time() - ttl.total_seconds()
    old: dict[str, Path] = {}
    for path in root.glob(f"*{UPLOAD_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            if path.is_file() and path.stat().st_mtime < cutoff:
                old[path.name.removesuffix(UPLOAD_SUFFIX)] = path
    if not old:
        return 0
    with database.unit_of_work() as uow:
        with_rows = set(uow.session.scalars(select(Upload.id).where(Upload.id.in_(list(old)))))
    orphans = {upload_id: path for upload_id, path in old.items() if upload_id not in with_rows}
    if not orphans:
        return 0
    in_use = names_in_use()
    if in_use is None:
        log.warning(
            "%d upload file(s) without a row kept: a source's settings cannot be read", len(orphans)
        )
        return 0
    removed = 0
    for path in orphans.values():
        if path.name in in_use:
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
