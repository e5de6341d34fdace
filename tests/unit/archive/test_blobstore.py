"""The blob store: a conformance suite every implementation must pass, then what
only the local backend promises (layout, read-only files, fsync before return)."""

from __future__ import annotations

import hashlib
import inspect
import itertools
import os
import stat
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ingestion_grpc.archive import blobstore
from ingestion_grpc.archive.blobstore import (
    BlobNotFound,
    BlobStore,
    InvalidDigest,
    LocalBlobStore,
    blob_store_from_settings,
    sha256_hex,
)
from ingestion_grpc.config import Settings
from ingestion_grpc.errors import InvalidArgument, NotFound
from tests.support.s3 import S3Archive

# Every implementation: on a fresh temporary directory, or a new bucket of the
# session's S3-protocol server (moto_server, tests/support/s3.py).
IMPLEMENTATIONS = ["local", "s3"]


def _new_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if kind == "local":
        return LocalBlobStore(tmp_path / "blobs")
    archive: S3Archive = request.getfixturevalue("s3_archive")
    return archive.store()


EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
MISSING = "0" * 64
BAD_DIGESTS = [
    "",
    "abc",
    "0" * 63,
    "0" * 65,
    "A" * 64,  # uppercase is not the canonical name
    "g" * 64,
    "../" + "0" * 61,
    "/" + "0" * 63,
    "0" * 63 + "\x00",
    "0" * 63 + "\n",
]


@pytest.fixture(params=IMPLEMENTATIONS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    return _new_store(request.param, request, tmp_path)


# The interface


def _abstract_methods() -> list[str]:
    return [
        name
        for name, member in vars(BlobStore).items()
        if inspect.isfunction(member) and "raise NotImplementedError" in inspect.getsource(member)
    ]


def test_the_interface_is_small_and_documented() -> None:
    assert sorted(_abstract_methods()) == ["delete", "exists", "listing", "open", "put", "size"]
    for name, member in vars(BlobStore).items():
        if inspect.isfunction(member):
            assert member.__doc__, f"BlobStore.{name} has no docstring"


def test_implementation_matches_interface(store: BlobStore) -> None:
    cls = type(store)
    assert issubclass(cls, BlobStore)
    for name in _abstract_methods():
        assert getattr(cls, name) is not getattr(BlobStore, name), f"{cls.__name__}.{name}"
    for name, member in vars(BlobStore).items():
        if inspect.isfunction(member) and not name.startswith("_"):
            assert inspect.signature(getattr(cls, name)) == inspect.signature(member), name


def test_errors_belong_to_the_error_tree() -> None:
    assert issubclass(BlobNotFound, NotFound)
    assert issubclass(InvalidDigest, InvalidArgument)
    assert InvalidDigest().field == "sha256"


# Conformance: every implementation


def test_put_then_open_gives_identical_bytes(store: BlobStore) -> None:
    data = b"From: a@example.com\r\nSubject: hi\r\n\r\n\x00\xff body\r\n"
    digest = store.put(data)
    assert digest == hashlib.sha256(data).hexdigest() == sha256_hex(data)
    with store.open(digest) as blob:
        assert blob.read() == data
    assert store.read(digest) == data
    assert store.exists(digest)
    assert store.size(digest) == len(data)


def test_empty_and_large_blobs(store: BlobStore) -> None:
    assert store.put(b"") == EMPTY_SHA256
    assert store.read(EMPTY_SHA256) == b""
    assert store.size(EMPTY_SHA256) == 0
    big = os.urandom(3 << 20)
    digest = store.put(big)
    assert store.read(digest) == big
    assert store.size(digest) == len(big)


def test_put_is_idempotent(store: BlobStore) -> None:
    data = b"the same bytes"
    first = store.put(data)
    assert store.put(data) == first
    assert store.put_many([data, data]) == [first, first]
    assert store.read(first) == data


def test_put_many_returns_digests_in_order(store: BlobStore) -> None:
    blobs = [f"message {i}".encode() for i in range(50)]
    blobs.insert(10, blobs[3])  # a duplicate inside the batch
    digests = store.put_many(blobs)
    assert digests == [sha256_hex(data) for data in blobs]
    for digest, data in zip(digests, blobs, strict=True):
        assert store.read(digest) == data
    assert store.put_many([]) == []


def test_missing_blob(store: BlobStore) -> None:
    assert not store.exists(MISSING)
    with pytest.raises(BlobNotFound):
        store.open(MISSING)
    with pytest.raises(BlobNotFound):
        store.read(MISSING)
    with pytest.raises(BlobNotFound):
        store.size(MISSING)
    store.delete(MISSING)  # deleting what is not there is fine


def test_delete(store: BlobStore) -> None:
    digest = store.put(b"to be deleted")
    store.delete(digest)
    assert not store.exists(digest)
    with pytest.raises(BlobNotFound):
        store.open(digest)
    store.delete(digest)
    assert store.put(b"to be deleted") == digest  # and it can come back
    assert store.read(digest) == b"to be deleted"


@pytest.mark.parametrize("bad", BAD_DIGESTS)
def test_invalid_digest_is_rejected_everywhere(store: BlobStore, bad: str) -> None:
    for call in (store.open, store.read, store.exists, store.size, store.delete):
        with pytest.raises(InvalidDigest):
            call(bad)


# LocalBlobStore specifics


def test_local_layout_and_read_only_files(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "deep" / "blobs")
    data = b"layout"
    digest = store.put(data)
    path = tmp_path / "deep" / "blobs" / digest[:2] / digest
    assert store.path(digest) == path
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert [p.name for p in path.parent.iterdir()] == [digest]  # no temporary file left


def test_local_second_put_does_not_rewrite(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    digest = store.put(b"once")
    inode = store.path(digest).stat().st_ino
    store.put(b"once")
    store.put_many([b"once"])
    assert store.path(digest).stat().st_ino == inode


def test_local_repairs_a_damaged_blob(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    digest = store.put(b"whole message")
    path = store.path(digest)
    path.chmod(0o644)
    path.write_bytes(b"whole")  # damaged outside the store
    assert store.put(b"whole message") == digest
    assert path.read_bytes() == b"whole message"


def test_local_put_many_is_durable_before_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without syncfs(2): every file is fsync'd before its rename; after the
    renames, every blob's directory and the parent of every new directory, each once."""
    monkeypatch.setattr(blobstore, "_syncfs", None)
    store = LocalBlobStore(tmp_path / "blobs")
    store.put(b"first")  # the root exists from here on
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(("replace", f"{src} -> {dst}"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    blobs = [f"blob {i}".encode() * 100 for i in range(300)]  # more than one chunk
    digests = store.put_many(blobs)
    monkeypatch.undo()

    last_rename = max(i for i, (kind, _) in enumerate(events) if kind == "replace")
    synced_after = [target for kind, target in events[last_rename:] if kind == "fsync"]
    for digest in digests:
        final = store.path(digest)
        rename_at, rename = next(
            (i, target)
            for i, (kind, target) in enumerate(events)
            if kind == "replace" and target.endswith(f" -> {final}")
        )
        temporary = rename.split(" -> ")[0]
        assert ("fsync", temporary) in events[:rename_at], digest
        assert str(final.parent) in synced_after, digest
        assert str(final.parent.parent) in synced_after, digest  # it was created
    assert str(store.root) in synced_after  # it gained first-level directories
    assert len(synced_after) == len(set(synced_after))  # once per batch, not per blob

    # A second batch into existing directories syncs only the blobs' directories.
    events.clear()
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(blobstore, "_syncfs", None)
    more = [b"another " + data for data in blobs[:50]]
    for data in more:
        store.path(sha256_hex(data)).parent.mkdir(parents=True, exist_ok=True)
    store.put_many(more)
    monkeypatch.undo()
    directories = {target for kind, target in events if kind == "fsync" and Path(target).is_dir()}
    assert directories == {str(store.path(sha256_hex(data)).parent) for data in more}


def test_local_failed_batch_leaves_no_temporary_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalBlobStore(tmp_path)
    real_replace = os.replace
    calls = itertools.count(1)  # next() is atomic: the writers run in threads

    def failing_replace(src: str, dst: str) -> None:
        if next(calls) == 3:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        store.put_many([f"blob {i}".encode() for i in range(10)])
    monkeypatch.undo()
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    assert leftovers == []
    stored = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert 2 <= len(stored) <= 9  # those written before (or beside) the failure: whole
    for path in stored:
        assert sha256_hex(path.read_bytes()) == path.name


REQUIRED_SETTINGS = {
    "DATABASE_URL": "postgresql://db",
    "REDIS_URL": "redis://r",
    "JWT_SECRET": "s" * 32,
    "ENCRYPTION_KEY": "ab" * 32,
}


def test_blob_store_from_settings_defaults_to_files_under_data_dir(tmp_path: Path) -> None:
    store = blob_store_from_settings(
        Settings.from_env({**REQUIRED_SETTINGS, "DATA_DIR": str(tmp_path)})
    )
    assert isinstance(store, LocalBlobStore)
    assert store.root == tmp_path / "blobs"
    digest = store.put(b"configured")
    assert (tmp_path / "blobs" / digest[:2] / digest).is_file()
    elsewhere = tmp_path / "other place"
    chosen = blob_store_from_settings(
        Settings.from_env({**REQUIRED_SETTINGS, "ARCHIVE_URL": elsewhere.as_uri()})
    )
    assert isinstance(chosen, LocalBlobStore)
    assert chosen.root == elsewhere


def test_local_listing_skips_what_is_not_a_blob(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    digest = store.put(b"listed")
    (store.path(digest).parent / f".{digest[:16]}.1-1.tmp").write_bytes(b"half")
    (tmp_path / "README").write_text("not a blob")
    misplaced = tmp_path / "zz" / sha256_hex(b"elsewhere")
    misplaced.parent.mkdir()
    misplaced.write_bytes(b"elsewhere")
    assert [name for name, _ in store.listing()] == [digest]


@pytest.mark.skipif(blobstore._syncfs is None, reason="no syncfs(2) on this platform")
def test_local_put_many_syncs_the_file_system_after_the_last_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    events: list[str] = []
    real_replace, real_sync = os.replace, blobstore._sync_file_system

    def replace(src: str, dst: str) -> None:
        events.append("replace")
        real_replace(src, dst)

    def sync(path: Path) -> None:
        events.append(f"syncfs {path}")
        real_sync(path)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(blobstore, "_sync_file_system", sync)
    blobs = [f"blob {i}".encode() for i in range(300)]
    digests = store.put_many(blobs)
    assert events == ["replace"] * 300 + [f"syncfs {store.root}"]
    assert [store.read(d) for d in digests] == blobs


# Conformance, continued: reading in pieces, and the listing the orphan sweep uses


def test_open_reads_in_pieces(store: BlobStore) -> None:
    data = os.urandom((2 << 20) + 17)
    digest = store.put(data)
    pieces = []
    with store.open(digest) as blob:
        while piece := blob.read(1 << 20):
            assert len(piece) <= 1 << 20
            pieces.append(piece)
    assert len(pieces) == 3
    assert b"".join(pieces) == data


def test_listing_names_every_blob_with_its_time(store: BlobStore) -> None:
    assert list(store.listing()) == []
    before = datetime.now(UTC) - timedelta(seconds=2)
    digests = store.put_many([b"one", b"two", b"three"])
    store.delete(digests[1])
    after = datetime.now(UTC) + timedelta(seconds=2)
    listed = dict(store.listing())
    assert set(listed) == {digests[0], digests[2]}
    for modified in listed.values():
        assert modified.tzinfo is not None
        assert before <= modified <= after


def test_reading_in_pieces_never_holds_the_whole_blob(store: BlobStore) -> None:
    """A large message streams: memory while reading it is a piece, not the blob."""
    data = os.urandom(12 << 20)
    digest = store.put(data)
    del data
    tracemalloc.start()
    try:
        with store.open(digest) as blob:
            hashed = hashlib.sha256()
            while piece := blob.read(1 << 20):
                hashed.update(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert hashed.hexdigest() == digest
    assert peak < 6 << 20
