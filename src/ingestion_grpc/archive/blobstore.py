"""Content-addressed storage of message bytes, behind the small `BlobStore` interface.

A blob is named by the lowercase hex SHA-256 of its bytes, so content can never
change under a name and storing the same bytes twice is a no-op. A store must
make a blob durable before `put` / `put_many` returns: the caller commits the
metadata row that names the blob right after, and a row must never point at
bytes a crash could lose.

Backends are named after where they keep the bytes (`LocalBlobStore` here,
`s3.S3BlobStore`); the one in use is chosen by `blob_store_from_settings`, from
ARCHIVE_URL.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import itertools
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar
from urllib.parse import unquote, urlsplit

from ingestion_grpc.errors import InvalidArgument, NotFound
from ingestion_grpc.telemetry.metrics import BLOB_WRITE_SECONDS

if TYPE_CHECKING:
    from ingestion_grpc.config import Settings

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"[0-9a-f]{64}")

# Blob files written at once by `LocalBlobStore.put_many`. Creating a file can keep
# the kernel busy (up to 0.7 ms each on some ext4 file systems without a journal,
# see docs/benchmarks.md), and an fsync'ing store (no syncfs) waits on every
# file: two writers overlap that. More measured no faster: each
# system call hands Python's GIL back and forth with the IMAP reader and the
# catalog insert.
_WRITERS = 2

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)

# Numbers temporary file names in this process (next() is atomic in CPython).
_temporary_numbers = itertools.count()

_T = TypeVar("_T")
_R = TypeVar("_R")


class BlobNotFound(NotFound):
    """Raised when no blob with the given SHA-256 is stored."""


class InvalidDigest(InvalidArgument):
    """Raised when a blob name is not 64 lowercase hex characters."""

    def __init__(self) -> None:
        super().__init__("sha256", "must be 64 lowercase hexadecimal characters")


def sha256_hex(data: bytes) -> str:
    """Return the name a blob store gives `data`: its lowercase hex SHA-256."""
    return hashlib.sha256(data).hexdigest()


def is_digest(name: str) -> bool:
    """Whether `name` is a well-formed blob name (64 lowercase hex characters)."""
    return isinstance(name, str) and _DIGEST.fullmatch(name) is not None


def check_digest(sha256: str) -> str:
    """Return `sha256` if it is a well-formed blob name, else raise InvalidDigest.

    Every backend calls this before using a name, so a name can never become a
    path outside the store (`../`, `/`, NUL) or a key it did not mean.
    """
    if not is_digest(sha256):
        raise InvalidDigest()
    return sha256


class BlobStore:
    """Base class of blob stores: subclasses override the methods that raise.

    Blobs are immutable and named by `sha256_hex` of their bytes. Every method
    that takes a name raises `InvalidDigest` for a malformed one. Deleting is
    the caller's decision: a blob may be named by several metadata rows.
    """

    def put(self, data: bytes) -> str:
        """Store `data` durably and return its SHA-256 name.

        Idempotent: if the blob already exists the bytes are not written again.
        When this returns, the blob survives a crash or power loss.
        """
        raise NotImplementedError

    def put_many(self, blobs: list[bytes]) -> list[str]:
        """Store every blob durably; return their names in the order given.

        Duplicates in `blobs` are fine (and stored once). When this returns,
        every blob of the batch survives a crash; if it raises, some of the
        batch may be stored, which is harmless because names are content.
        """
        return [self.put(data) for data in blobs]

    def open(self, sha256: str) -> BinaryIO:
        """Return a binary file object reading the blob; raise BlobNotFound if absent."""
        raise NotImplementedError

    def read(self, sha256: str) -> bytes:
        """Return the blob's bytes; raise BlobNotFound if absent."""
        with self.open(sha256) as blob:
            return blob.read()

    def exists(self, sha256: str) -> bool:
        """Return whether the blob is stored."""
        raise NotImplementedError

    def size(self, sha256: str) -> int:
        """Return the blob's length in bytes; raise BlobNotFound if absent."""
        raise NotImplementedError

    def delete(self, sha256: str) -> None:
        """Remove the blob; removing one that is not stored is not an error."""
        raise NotImplementedError

    def listing(self) -> Iterator[tuple[str, datetime]]:
        """Yield `(name, last modified, in UTC)` of every stored blob, in no order.

        For the orphan sweep, which leaves young blobs alone: a batch stores its
        blobs before it commits the rows naming them.
        """
        raise NotImplementedError


class ConcurrentCalls:
    """A function over many arguments, `workers` at a time, on a pool started when
    first needed; `inline_up_to` arguments or fewer run in the caller's thread."""

    def __init__(self, workers: int, name: str, *, inline_up_to: int) -> None:
        self._workers = workers
        self._name = name
        self._inline_up_to = inline_up_to
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def run_all(self, func: Callable[[_T], _R], args: Iterable[_T]) -> list[_R]:
        """`func` of every argument, in order; raise the first error, but only
        once every call has ended (none is left writing after a failure)."""
        todo = list(args)
        if len(todo) <= self._inline_up_to:  # not worth a thread hop
            return [func(arg) for arg in todo]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix=self._name)
            pool = self._pool
        futures = [pool.submit(func, arg) for arg in todo]
        wait(futures)
        return [future.result() for future in futures]

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None


class LocalBlobStore(BlobStore):
    """Blobs as read-only files under `root`, at `root/ab/<sha256>`.

    A write goes to a temporary file in the blob's directory, then is renamed
    over the final name (`os.replace`). On Linux one syncfs(2) after a batch's
    renames makes every file, name and new directory of it durable; elsewhere
    each file is fsync'd before its rename, and the blob's directory (and the
    parent of any directory created on the way) after it.
    A reader sees a whole blob or none, and a blob is on disk before its name
    is returned. Leftover `.*.tmp` files in the tree come only from a crash
    mid-write and may be deleted.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._root = os.fspath(self.root)
        self._root_ready = False
        # Folders known to exist: blob folders are never removed, so each is
        # made (and looked for) once per process rather than once per blob.
        self._folders: set[str] = set()
        self._writers = ConcurrentCalls(_WRITERS, "blob-writer", inline_up_to=2)

    def path(self, sha256: str) -> Path:
        """Return where the blob lives (or would live)."""
        check_digest(sha256)
        # One level of 256 folders: a second level (65,536 folders) made nearly
        # every blob of a young archive create a folder; ext4 and XFS index
        # large folders, so millions of blobs per folder stay fast.
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        return self.put_many([data])[0]

    def put_many(self, blobs: list[bytes]) -> list[str]:
        """Store a batch: write every new file (several at a time), then make the
        batch durable at once (syncfs, or fsyncs of the files and their directories)."""
        with BLOB_WRITE_SECONDS.labels("local").time():
            return self._put_many(blobs)

    def _put_many(self, blobs: list[bytes]) -> list[str]:
        self._ensure_root()
        names = [sha256_hex(data) for data in blobs]
        fsync_files = _syncfs is None
        unique = list(dict(zip(names, blobs, strict=True)).items())
        created = self._writers.run_all(
            functools.partial(self._store_all, fsync=fsync_files), _slices(unique, _WRITERS)
        )
        if not fsync_files:
            # One barrier for the whole batch: syncfs(2) returns once every
            # file, rename and directory of this file system is on disk, which
            # costs a fraction of an fsync per file plus one per directory.
            _sync_file_system(self.root)
            return names
        # The blob's directory is fsync'd even when nothing was written: a writer
        # that crashed after its rename may have left the entry in memory only.
        dirs = dict.fromkeys(self._folder(name) for name in names)  # an ordered set
        dirs.update(dict.fromkeys(os.path.dirname(f) for folders in created for f in folders))
        self._writers.run_all(_fsync_dir, dirs)
        return names

    def open(self, sha256: str) -> BinaryIO:
        try:
            return open(self.path(sha256), "rb")
        except FileNotFoundError:
            raise BlobNotFound(f"blob {sha256} is not stored") from None

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(f"blob {sha256} is not stored") from None

    def delete(self, sha256: str) -> None:
        final = self.path(sha256)
        try:
            final.unlink()
        except FileNotFoundError:
            return
        # Empty directories stay: removing one could race a concurrent put.
        _fsync_dir(final.parent)

    def listing(self) -> Iterator[tuple[str, datetime]]:
        try:
            folders = list(os.scandir(self._root))
        except FileNotFoundError:
            return
        for folder in folders:
            if len(folder.name) != 2 or not folder.is_dir(follow_symlinks=False):
                continue
            with os.scandir(folder.path) as entries:
                for entry in entries:
                    if is_digest(entry.name) and entry.name[:2] == folder.name:
                        try:
                            modified = entry.stat(follow_symlinks=False).st_mtime
                        except FileNotFoundError:  # deleted meanwhile
                            continue
                        yield entry.name, datetime.fromtimestamp(modified, UTC)

    def _ensure_root(self) -> None:
        if self._root_ready:
            return
        missing = [p for p in (self.root, *self.root.parents) if not p.exists()]
        self.root.mkdir(parents=True, exist_ok=True)
        for created in reversed(missing):
            _fsync_dir(created.parent)
        self._root_ready = True

    def _folder(self, name: str) -> str:
        """`path(name).parent` as a string, for a name this store computed (the
        hot path of put_many: pathlib and the digest check cost more than the
        system calls)."""
        return f"{self._root}/{name[:2]}"

    def _store_all(self, items: list[tuple[str, bytes]], *, fsync: bool) -> list[str]:
        """Write the blobs not stored yet; return the folders this call created.

        A folder found in place was synced by the writer that created it (a
        writer that crashed first left an entry that the journal commits with
        the next fsync on ext4 and XFS).
        """
        created = []
        for name, data in items:
            folder = self._folder(name)
            if folder not in self._folders:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(folder)
                    created.append(folder)
                self._folders.add(folder)
            if not _holds(folder, name, len(data)):
                _write_file(folder, name, data, fsync=fsync)
        return created


def _holds(folder: str, name: str, size: int) -> bool:
    """Whether the blob's file exists whole (a name is its content; the size check
    catches a file damaged outside this code)."""
    try:
        found = os.stat(f"{folder}/{name}").st_size
    except FileNotFoundError:
        return False
    if found != size:
        log.warning("blob %s has %d bytes, expected %d: rewriting it", name, found, size)
        return False
    return True


def _write_file(folder: str, name: str, data: bytes, *, fsync: bool) -> None:
    """Write `data` to a temporary file in `folder`, then rename it to `name`."""
    fd, tmp = _create_temporary(folder, name)
    try:
        try:
            _write_all(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, f"{folder}/{name}")
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _slices(items: list[_T], count: int) -> list[list[_T]]:
    """`items` in at most `count` consecutive runs (one for a handful of items)."""
    if len(items) <= 16:
        return [items] if items else []
    size = -(-len(items) // count)
    return [items[start : start + size] for start in range(0, len(items), size)]


def _load_syncfs() -> Callable[[int], int] | None:
    """Linux's syncfs(2), or None where the C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    syncfs: Callable[[int], int] = function
    return syncfs


_syncfs = _load_syncfs()


def _sync_file_system(path: Path) -> None:
    assert _syncfs is not None
    fd = os.open(path, os.O_RDONLY)
    try:
        if _syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"syncfs failed: {os.strerror(error)}", str(path))
    finally:
        os.close(fd)


def blob_store_from_settings(settings: Settings) -> BlobStore:
    """Return the blob store ARCHIVE_URL names: see `blob_store_at`."""
    return blob_store_at(settings.archive_url, settings.s3_endpoint_url, settings.data_dir)


def blob_store_at(archive_url: str, s3_endpoint_url: str, data_dir: Path) -> BlobStore:
    """Return the blob store `archive_url` names (config.parse_archive_url checked it):
    `file:///path` (the default: DATA_DIR/blobs) or `s3://bucket/prefix`, at
    `s3_endpoint_url` when set.

    This is the one place a backend is chosen; callers only see `BlobStore`.
    """
    url = urlsplit(archive_url) if archive_url else None
    if url is None:
        return LocalBlobStore(Path(data_dir) / "blobs")
    if url.scheme == "file":
        return LocalBlobStore(Path(unquote(url.path)))
    # Imported when chosen: the S3 backend builds on this module, and a process
    # with a local archive never loads boto3.
    from ingestion_grpc.archive.s3 import S3BlobStore, s3_client

    return S3BlobStore(url.netloc, unquote(url.path), client=s3_client(s3_endpoint_url or None))


def _create_temporary(folder: str, name: str) -> tuple[int, str]:
    """Create a new, uniquely named, read-only file in `folder`; open it for writing.

    Created with its final mode (the mode applies to later opens, not this one),
    which saves an fchmod per blob; O_EXCL makes a name clash an error, not a
    shared file.
    """
    while True:
        tmp = f"{folder}/.{name[:16]}.{os.getpid()}-{next(_temporary_numbers)}.tmp"
        try:
            return os.open(tmp, _CREATE_FLAGS, 0o444), tmp
        except FileExistsError:  # left by a crashed process that had our pid
            continue


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path | str) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
