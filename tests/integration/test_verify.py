"""`ingestion-grpc verify [SOURCE_ID]` as an operator runs it: a subprocess with
DATABASE_URL, DATA_DIR and ARCHIVE_URL, output to a pipe, over an archive made
by a real mbox import (REST -> gRPC -> Dramatiq worker). One blob damaged (a
byte flipped), one deleted: both are reported, by name, and the exit code says
so; with the local archive and with the S3 one (moto_server)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ingestion_grpc.archive.blobstore import LocalBlobStore, blob_store_from_settings
from ingestion_grpc.archive.s3 import S3BlobStore
from tests.support.s3 import credentials_in_environment
from tests.support.sources import archived, create_source, settled
from tests.support.stacks import Stack

CLI = str(Path(sys.executable).parent / "ingestion-grpc")
MESSAGES = 12


def _unique_mbox(path: Path) -> list[bytes]:
    """An mbox of messages no other test archives: their blobs are this test's to damage."""
    tag = uuid.uuid4().hex
    messages = [
        (
            f"From: verify-{index}@example.com\nTo: archive@example.com\n"
            f"Subject: verify {tag} {index}\nMessage-ID: <{tag}.{index}@example.com>\n\n"
            f"Body {index} of {tag}: {'x' * (index * 50)}\n"
        ).encode()
        for index in range(MESSAGES)
    ]
    with path.open("wb") as out:
        for raw in messages:
            out.write(b"From verify@example.com Thu Jan  1 00:00:00 2004\n" + raw + b"\n")
    return messages


def verify(stack: Stack, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """The command with the stack's DATABASE_URL, DATA_DIR and ARCHIVE_URL (and, for
    S3, its endpoint and credentials), as an operator's shell has them."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in {"FORCE_COLOR", "TTY_COMPATIBLE"}
    }
    return subprocess.run(
        [CLI, "verify", *args],
        env={**environment, **stack.environment, **extra},
        capture_output=True,  # a pipe: plain lines
        text=True,
        timeout=120,
        check=False,
    )


class Damage:
    """Flips a byte of one blob and deletes another, in whichever store the stack uses."""

    def __init__(self, stack: Stack) -> None:
        self.settings = stack.settings
        if stack.archive == "s3":
            with credentials_in_environment():
                self.store = blob_store_from_settings(stack.settings)
        else:
            self.store = blob_store_from_settings(stack.settings)

    def flip_a_byte(self, sha256: str) -> bytes:
        content = bytearray(self.store.read(sha256))
        content[len(content) // 2] ^= 0x01
        if isinstance(self.store, S3BlobStore):
            # Not through the store: it would name the new bytes by their own digest.
            self.store._client.put_object(
                Bucket=self.store.bucket, Key=self.store.key(sha256), Body=bytes(content)
            )
        else:
            assert isinstance(self.store, LocalBlobStore)
            path = self.store.path(sha256)
            path.chmod(0o644)
            path.write_bytes(bytes(content))
        return bytes(content)

    def delete(self, sha256: str) -> None:
        self.store.delete(sha256)


@pytest.mark.parametrize("stack", ["local", "s3"], indirect=True)
def test_verify_reports_a_damaged_and_a_missing_blob(stack: Stack) -> None:
    settings = stack.settings
    user = stack.make_client("user")
    folder = settings.import_root / f"verify-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    try:
        mbox = folder / "verify.mbox"
        _unique_mbox(mbox)
        stack.start_worker()
        config = {"localFilePath": str(mbox.relative_to(settings.import_root))}
        source = create_source(user, "verify", "mbox_import", config)
        assert settled(user, source["id"])["status"] == "imported"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    source_id = source["id"]
    rows = sorted(archived(user, source_id), key=lambda row: row["sha256"])
    assert len(rows) == MESSAGES
    sizes = {row["sha256"]: int(row["sizeBytes"]) for row in rows}
    total = sum(sizes.values())

    whole = verify(stack, source_id)
    assert (whole.returncode, whole.stderr) == (0, "")
    assert whole.stdout.splitlines() == [
        f"verifying {MESSAGES} blobs ({total} bytes) of source {source_id}",
        f"checked {MESSAGES} blobs ({total} bytes): 0 missing, 0 damaged",
    ]

    damage = Damage(stack)
    damaged, missing = rows[3]["sha256"], rows[7]["sha256"]
    content = damage.flip_a_byte(damaged)
    damage.delete(missing)

    broken = verify(stack, source_id)
    assert (broken.returncode, broken.stderr) == (1, "")
    assert broken.stdout.splitlines() == [
        f"verifying {MESSAGES} blobs ({total} bytes) of source {source_id}",
        f"damaged: {damaged} (read {sizes[damaged]} bytes with SHA-256 "
        f"{hashlib.sha256(content).hexdigest()}; named by 1 message)",
        f"missing: {missing} ({sizes[missing]} bytes, named by 1 message)",
        f"checked {MESSAGES} blobs ({total - sizes[missing]} bytes): 1 missing, 1 damaged",
    ]

    # Without a source id the whole archive is checked, these two blobs with the
    # rest; on a terminal (as rich sees it) with a progress bar.
    everything = verify(stack, TTY_COMPATIBLE="1", COLUMNS="200")
    assert everything.returncode == 1
    assert " of every source" in everything.stdout
    assert broken.stdout.splitlines()[1] in everything.stdout
    assert broken.stdout.splitlines()[2] in everything.stdout


def test_verify_of_an_unknown_source_is_a_usage_error(stack: Stack) -> None:
    unknown = str(uuid.uuid4())
    done = verify(stack, unknown)
    assert done.returncode == 2
    assert done.stderr == f"error: no source with id {unknown}\n"
    assert done.stdout == ""
