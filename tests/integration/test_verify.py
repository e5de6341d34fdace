"""`ingestion-grpc verify [SOURCE_ID]` as an operator runs it: a subprocess with
DATABASE_URL and DATA_DIR, output to a pipe, over an archive made by a real mbox
import (REST -> gRPC -> Dramatiq worker). One blob damaged (a byte flipped), one
deleted: both are reported, by name, and the exit code says so."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from ingestion_grpc.archive.blobstore import LocalBlobStore
from ingestion_grpc.config import Settings
from tests.support.rest import Rest
from tests.support.sources import archived, create_source, settled
from tests.support.workers import Worker

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


def verify(settings: Settings, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in {"FORCE_COLOR", "TTY_COMPATIBLE", "DATABASE_URL", "DATA_DIR"}
    }
    return subprocess.run(
        [CLI, "verify", *args],
        env={
            **environment,
            "DATABASE_URL": settings.database_url,
            "DATA_DIR": str(settings.data_dir),
            **extra,
        },
        capture_output=True,  # a pipe: plain lines
        text=True,
        timeout=120,
        check=False,
    )


def test_verify_reports_a_damaged_and_a_missing_blob(
    make_client: Callable[[str], Rest],
    settings: Settings,
    start_worker: Callable[[], Worker],
) -> None:
    user = make_client("user")
    folder = settings.import_root / f"verify-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    try:
        mbox = folder / "verify.mbox"
        _unique_mbox(mbox)
        start_worker()
        source = create_source(
            user,
            "verify",
            "mbox_import",
            {"localFilePath": str(mbox.relative_to(settings.import_root))},
        )
        assert settled(user, source["id"])["status"] == "imported"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    source_id = source["id"]
    rows = sorted(archived(user, source_id), key=lambda row: row["sha256"])
    assert len(rows) == MESSAGES
    sizes = {row["sha256"]: int(row["sizeBytes"]) for row in rows}
    total = sum(sizes.values())

    whole = verify(settings, source_id)
    assert (whole.returncode, whole.stderr) == (0, "")
    assert whole.stdout.splitlines() == [
        f"verifying {MESSAGES} blobs ({total} bytes) of source {source_id}",
        f"checked {MESSAGES} blobs ({total} bytes): 0 missing, 0 damaged",
    ]

    blobs = LocalBlobStore(settings.data_dir / "blobs")
    damaged, missing = rows[3]["sha256"], rows[7]["sha256"]
    damaged_path = blobs.path(damaged)
    content = bytearray(damaged_path.read_bytes())
    content[len(content) // 2] ^= 0x01
    damaged_path.chmod(0o644)
    damaged_path.write_bytes(bytes(content))
    blobs.path(missing).unlink()

    broken = verify(settings, source_id)
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
    everything = verify(settings, TTY_COMPATIBLE="1", COLUMNS="200")
    assert everything.returncode == 1
    assert " of every source" in everything.stdout
    assert broken.stdout.splitlines()[1] in everything.stdout
    assert broken.stdout.splitlines()[2] in everything.stdout


def test_verify_of_an_unknown_source_is_a_usage_error(settings: Settings) -> None:
    unknown = str(uuid.uuid4())
    done = verify(settings, unknown)
    assert done.returncode == 2
    assert done.stderr == f"error: no source with id {unknown}\n"
    assert done.stdout == ""
