"""File imports end to end: REST -> gRPC -> Dramatiq worker -> archive, for mbox, EML
and PST files in IMPORT_ROOT and for an mbox sent through POST /v1/upload.

Counts are exact, and every archived byte is compared with what CPython's mailbox
module (mbox), the zip entry (EML) or the file itself gives for the same message.
The corpora are copied into this run's IMPORT_ROOT; ../shared/corpora is only read.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import uuid
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ingestion_grpc.config import Settings
from ingestion_grpc.engine.context import EngineContext
from tests.support.corpora import ENRON_PST, HAM, SPAM, mbox_messages
from tests.support.polling import wait_for
from tests.support.rest import Rest
from tests.support.sources import (
    archived,
    by_folder,
    create_source,
    kill_mid_run,
    latest_run,
    revived_by_watchdog,
    runs,
    settled,
)
from tests.support.stacks import Stack
from tests.support.workers import Worker

EML_FOLDERS = ["", "Archive", "Archive/2002", "Archive/2002/Lists", "Inbox"]
PST_TOP = "lokay-m/MLOKAY (Non-Privileged)"
PST_FOLDERS = {
    PST_TOP: 1,
    f"{PST_TOP}/TW-Commercial Group": 14,
    f"{PST_TOP}/Systems": 7,
    f"{PST_TOP}/Sent Items": 2,
    f"{PST_TOP}/Personal": 47,
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Files:
    """What a file-import test works with: a user, a folder of the test's own inside
    IMPORT_ROOT (removed after it), the engine, and real workers to start."""

    user: Rest
    folder: Path
    settings: Settings
    engine: EngineContext
    start_worker: Callable[[], Worker]

    def copy_in(self, corpus: Path, name: str | None = None) -> Path:
        target = self.folder / (name or corpus.name)
        shutil.copyfile(corpus, target)
        return target

    def relative(self, path: Path) -> str:
        """The path as a user gives it: relative to IMPORT_ROOT."""
        return path.relative_to(self.settings.import_root).as_posix()

    def create(self, name: str, provider: str, **config: Any) -> dict:
        return create_source(self.user, name, provider, config)


@pytest.fixture
def files(stack: Stack) -> Iterator[Files]:
    """For the local archive, or (with `stack` parametrized "s3") the S3 one."""
    folder = stack.settings.import_root / uuid.uuid4().hex[:12]
    folder.mkdir(parents=True)
    yield Files(stack.make_client("user"), folder, stack.settings, stack.engine, stack.start_worker)
    shutil.rmtree(folder, ignore_errors=True)


def assert_imported(client: Rest, source_id: str, count: int) -> list[dict]:
    """The source is `imported` after one completed import of exactly `count` messages."""
    done = settled(client, source_id)
    assert done["status"] == "imported", done
    assert done["lastSyncStatusMessage"] == (
        f"Imported: {count} new messages archived, 0 already present, from 1 of 1 mailboxes."
    )
    run = latest_run(client, source_id)
    assert (run["kind"], run["status"], run["mailboxesDone"]) == ("import", "completed", 1)
    assert (run["messagesFetched"], run["messagesArchived"]) == (count, count)
    rows = archived(client, source_id)
    assert len(rows) == count
    assert len({row["sha256"] for row in rows}) == count, "a message is archived twice"
    return rows


def assert_stored_exactly(
    client: Rest, engine: EngineContext, rows: list[dict], expected: Sequence[bytes]
) -> None:
    """The rows are exactly `expected` (as a multiset of SHA-256), every stored blob
    hashes to its row's digest, and a sample of them comes back byte for byte over REST."""
    assert Counter(row["sha256"] for row in rows) == Counter(sha256(raw) for raw in expected)
    for row in rows:
        assert sha256(engine.blobs.read(row["sha256"])) == row["sha256"]
    by_digest = {sha256(raw): raw for raw in expected}
    for row in random.Random(20240601).sample(rows, min(len(rows), 40)):
        response = client.get(f"/v1/archived-emails/{row['id']}/raw")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "message/rfc822"
        assert response.content == by_digest[row["sha256"]]


def assert_reimport_adds_nothing(client: Rest, source_id: str, count: int) -> None:
    response = client.post(f"/v1/ingestion-sources/{source_id}/import")
    assert response.status_code == 202, response.text
    assert settled(client, source_id)["status"] == "imported"
    run = latest_run(client, source_id)
    assert (run["kind"], run["status"]) == ("import", "completed")
    assert (run["messagesArchived"], run["messagesAlreadyPresent"]) == (0, count)
    assert len(archived(client, source_id)) == count


def test_mbox_files_are_archived_byte_for_byte_and_a_reimport_adds_nothing(
    files: Files,
) -> None:
    user = files.user
    ham = files.copy_in(HAM)
    spam = files.copy_in(SPAM)
    files.start_worker()
    ham_source = files.create("ham", "mbox_import", localFilePath=files.relative(ham))
    # an absolute path inside IMPORT_ROOT is as good as a relative one
    spam_source = files.create("spam", "mbox_import", localFilePath=str(spam))
    assert ham_source["status"] == "importing"

    for source, path, count in ((ham_source, ham, 2500), (spam_source, spam, 500)):
        rows = assert_imported(user, source["id"], count)
        assert {tuple(row["folderPaths"]) for row in rows} == {(path.name,)}
        assert {row["mailbox"] for row in rows} == {path.name}
        assert_stored_exactly(user, files.engine, rows, mbox_messages(path))

    assert_reimport_adds_nothing(user, ham_source["id"], 2500)
    sync = user.post(f"/v1/ingestion-sources/{ham_source['id']}/sync")
    assert sync.status_code == 400, sync.text
    assert "File sources have no continuous sync" in sync.json()["message"]
    assert len(runs(user, ham_source["id"])) == 2
    # A local file is read, never changed or removed.
    assert sha256(ham.read_bytes()) == sha256(HAM.read_bytes())
    assert sha256(spam.read_bytes()) == sha256(SPAM.read_bytes())


def test_a_zip_of_eml_files_keeps_its_folders(files: Files) -> None:
    ham = mbox_messages(HAM)
    entries = {}
    for index, raw in enumerate(ham):
        folder = EML_FOLDERS[index % len(EML_FOLDERS)]
        entries[f"{folder}/{index:04d}.eml".lstrip("/")] = raw
    archive = files.folder / "ham.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as writer:
        for name, raw in entries.items():
            writer.writestr(name, raw)
    files.start_worker()
    source = files.create("eml", "eml_import", localFilePath=files.relative(archive))

    rows = assert_imported(files.user, source["id"], 2500)
    assert_stored_exactly(files.user, files.engine, rows, ham)
    expected: dict[str, set[str]] = {}
    for name, raw in entries.items():
        expected.setdefault(name.rpartition("/")[0], set()).add(sha256(raw))
    assert by_folder(rows) == expected
    assert {row["mailbox"] for row in rows} == {"ham.zip"}


def test_a_pst_file_gives_71_messages_in_5_folders_the_same_every_time(files: Files) -> None:
    pst = files.copy_in(ENRON_PST)
    files.start_worker()
    source = files.create("pst", "pst_import", localFilePath=files.relative(pst))

    rows = assert_imported(files.user, source["id"], 71)
    assert {folder: len(digests) for folder, digests in by_folder(rows).items()} == PST_FOLDERS
    for row in rows:
        assert sha256(files.engine.blobs.read(row["sha256"])) == row["sha256"]
    sample = rows[0]
    raw = files.user.get(f"/v1/archived-emails/{sample['id']}/raw")
    assert raw.status_code == 200
    assert sha256(raw.content) == sample["sha256"]
    # The rebuilt messages are deterministic: a second import finds every one.
    assert_reimport_adds_nothing(files.user, source["id"], 71)


def test_a_bad_local_path_is_a_400_naming_the_field_and_creates_nothing(files: Files) -> None:
    notes = files.folder / "notes.mbox"
    notes.write_bytes(b"Subject: not an mbox\n\nhello\n")
    cases = {
        str(HAM): "must be inside the folder set by IMPORT_ROOT",  # outside the root
        "../escape.mbox": "must not contain '..'",
        f"{files.relative(files.folder)}/missing.mbox": "does not exist",
        files.relative(notes): "is not an mbox file",
    }
    for path, reason in cases.items():
        response = files.user.post(
            "/v1/ingestion-sources",
            json={
                "name": f"bad {path}",
                "provider": "mbox_import",
                "providerConfig": {"localFilePath": path},
            },
        )
        assert response.status_code == 400, (path, response.text)
        body = response.json()
        assert body["message"].startswith("providerConfig.localFilePath: "), body
        assert reason in body["message"], body
        violations = body["details"][0]["fieldViolations"]
        assert [v["field"] for v in violations] == ["providerConfig.localFilePath"]
    listed = files.user.get("/v1/ingestion-sources")
    assert (listed.status_code, listed.json()) == (200, []), listed.text


@pytest.mark.parametrize("stack", ["local", "s3"], indirect=True)
def test_an_uploaded_mbox_is_imported_exactly_then_removed(files: Files) -> None:
    user = files.user
    data = SPAM.read_bytes()
    response = user.post("/v1/upload", data=data, headers={"Content-Type": "application/mbox"})
    assert response.status_code == 201, response.text
    file_path = response.json()["filePath"]
    uploaded = files.settings.upload_root / file_path
    assert uploaded.read_bytes() == data
    local = files.copy_in(SPAM, "local-spam.mbox")
    files.start_worker()
    source = files.create("uploaded", "mbox_import", uploadedFilePath=file_path)

    rows = assert_imported(user, source["id"], 500)
    assert {tuple(row["folderPaths"]) for row in rows} == {(file_path,)}
    assert_stored_exactly(user, files.engine, rows, mbox_messages(SPAM))
    # Removed once the run is closed (just after the source says `imported`).
    wait_for(uploaded.exists, lambda exists: not exists, timeout=10, what="the upload to go")
    assert local.read_bytes() == data

    # Nothing left to read: a new import fails, visibly, and archives nothing.
    assert user.post(f"/v1/ingestion-sources/{source['id']}/import").status_code == 202
    failed = settled(user, source["id"])
    assert failed["status"] == "error", failed
    assert "uploadedFilePath" in failed["lastSyncStatusMessage"]
    assert len(archived(user, source["id"])) == 500


def big_mbox(path: Path, copies: int) -> None:
    """The ham corpus `copies` times, each copy's messages made unique by a header."""
    with path.open("wb") as out:
        for copy in range(copies):
            for raw in mbox_messages(HAM):
                out.write(b"From copy@example.com Sat Jan  1 00:00:00 2000\n")
                out.write(b"X-Copy: %d\n" % copy)
                out.write(raw)
                out.write(b"\n")


def test_a_killed_worker_mid_mbox_resumes_from_its_checkpoint(files: Files) -> None:
    user = files.user
    path = files.folder / "big.mbox"
    big_mbox(path, copies=3)
    expected = mbox_messages(path)
    total = len(expected)
    assert total == 7_500 and path.stat().st_size > 25_000_000

    worker = files.start_worker()
    source = files.create("big", "mbox_import", localFilePath=files.relative(path))
    kill_mid_run(user, source["id"], worker, total)
    files.start_worker()
    done = revived_by_watchdog(user, files.engine, source["id"])
    assert done["status"] == "imported", done
    run = latest_run(user, source["id"])
    assert (run["status"], run["messagesArchived"]) == ("completed", total)
    # Fetched counts only committed batches: the new worker read exactly what the
    # checkpoint had not covered (from zero it would be total + what the first archived).
    assert run["messagesFetched"] == total, run
    rows = archived(user, source["id"])
    assert len(rows) == total
    assert Counter(row["sha256"] for row in rows) == Counter(sha256(raw) for raw in expected)
