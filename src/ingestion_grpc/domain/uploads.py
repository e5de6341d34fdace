"""Uploaded files: received piece by piece, kept under UPLOAD_ROOT only once whole.

An upload is written to a hidden `.<uuid>.partial` file next to its final
place, fsynced, then renamed to `<uuid>.upload` (and the folder fsynced), so a
`.upload` file is always complete and durable. Names are always the server's
own: nothing a client sends ends up in a path. Whatever stops an upload early
(the size limit, a client that disconnects, a full disk) deletes its partial
file.
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

from ingestion_grpc import errors
from ingestion_grpc.providers.files import UPLOAD_SUFFIX

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


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
