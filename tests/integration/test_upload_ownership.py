"""Uploads belong to their uploader and feed one source at most; unused ones are
removed after UPLOAD_TTL by the scheduler's sweep."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select, update

from ingestion_grpc.config import Settings
from ingestion_grpc.db.models import IngestionSource, Upload, User
from ingestion_grpc.engine import upload_sweep
from ingestion_grpc.engine.context import EngineContext
from ingestion_grpc.server import RunningServer
from tests.support.corpora import SPAM, mbox_messages
from tests.support.rest import Rest

FIELD = "providerConfig.uploadedFilePath"


@pytest.fixture(scope="module")
def small_mbox() -> bytes:
    return b"".join(
        b"From sender@example.com Thu Jan  1 00:00:00 2004\n" + raw + b"\n"
        for raw in mbox_messages(SPAM)[:2]
    )


def upload(client: Rest, data: bytes) -> str:
    response = client.post("/v1/upload", data=data, headers={"Content-Type": "application/mbox"})
    assert response.status_code == 201, response.text
    file_path: str = response.json()["filePath"]
    return file_path


def from_upload(client: Rest, file_path: str) -> tuple[int, dict]:
    response = client.post(
        "/v1/ingestion-sources",
        json={
            "name": f"from {file_path}",
            "provider": "mbox_import",
            "providerConfig": {"uploadedFilePath": file_path},
        },
    )
    return response.status_code, response.json()


def not_found(file_path: str) -> tuple[int, dict]:
    return 404, {"code": 5, "message": f"{FIELD}: upload {file_path!r} not found.", "details": []}


def used(file_path: str) -> tuple[int, dict]:
    return 409, {
        "code": 10,
        "message": f"{FIELD}: upload {file_path!r} was already used for a source; "
        "upload the file again to create another.",
        "details": [],
    }


def test_only_the_uploader_or_an_admin_uses_an_upload_and_only_once(
    make_client: Callable[[str], Rest], admin: Rest, small_mbox: bytes
) -> None:
    alice, bob = make_client("user"), make_client("user")
    mine = upload(alice, small_mbox)
    # Someone else's upload and no upload at all get the same answer.
    assert from_upload(bob, mine) == not_found(mine)
    missing = f"{uuid.uuid4()}.upload"
    assert from_upload(bob, missing) == not_found(missing)
    assert from_upload(alice, "notes.txt") == not_found("notes.txt")
    assert bob.get("/v1/ingestion-sources").json() == []

    status, source = from_upload(alice, mine)
    assert status == 201, source
    assert from_upload(alice, mine) == used(mine)
    assert from_upload(admin, mine) == used(mine)
    # An admin may use anyone's.
    theirs = upload(alice, small_mbox)
    assert from_upload(admin, theirs)[0] == 201


def test_an_update_claims_its_upload_like_a_create(
    make_client: Callable[[str], Rest], small_mbox: bytes
) -> None:
    alice, bob = make_client("user"), make_client("user")
    status, source = from_upload(alice, upload(alice, small_mbox))
    assert status == 201, source
    path = f"/v1/ingestion-sources/{source['id']}"
    claimed_elsewhere = upload(alice, small_mbox)
    assert from_upload(alice, claimed_elsewhere)[0] == 201

    def change_to(file_path: str) -> tuple[int, dict]:
        response = alice.put(path, json={"providerConfig": {"uploadedFilePath": file_path}})
        return response.status_code, response.json()

    assert change_to(claimed_elsewhere) == used(claimed_elsewhere)
    bobs = upload(bob, small_mbox)
    assert change_to(bobs) == not_found(bobs)
    fresh = upload(alice, small_mbox)
    assert change_to(fresh)[0] == 200
    # Keeping the one it has is fine; no other source can have it now.
    assert change_to(fresh)[0] == 200
    assert from_upload(alice, fresh) == used(fresh)


def _age(server: RunningServer, upload_root: Path, upload_id: str, by: timedelta) -> None:
    """Make an upload look `by` older: its row and its file."""
    with server.database.unit_of_work() as uow:
        uow.session.execute(
            update(Upload).where(Upload.id == upload_id).values(created_at=func.now() - by)
        )
        uow.commit()
    _age_file(upload_root / f"{upload_id}.upload", by)


def _age_file(path: Path, by: timedelta) -> None:
    then = time.time() - by.total_seconds()
    os.utime(path, (then, then))


def test_the_sweep_removes_unused_expired_uploads_and_nothing_in_use(
    make_client: Callable[[str], Rest],
    grpc_server: RunningServer,
    engine: EngineContext,
    settings: Settings,
    small_mbox: bytes,
) -> None:
    alice = make_client("user")
    root = settings.upload_root
    old = engine.upload_ttl + timedelta(hours=1)

    unused = upload(alice, small_mbox)
    in_use = upload(alice, small_mbox)
    assert from_upload(alice, in_use)[0] == 201
    fresh = upload(alice, small_mbox)
    # Written by a server that died before recording it.
    orphan = f"{uuid.uuid4()}.upload"
    (root / orphan).write_bytes(small_mbox)
    # From before uploads had rows, named by a source: kept.
    legacy = upload(alice, small_mbox)
    assert from_upload(alice, legacy)[0] == 201
    with grpc_server.database.unit_of_work() as uow:
        uow.session.execute(delete(Upload).where(Upload.id == legacy.removesuffix(".upload")))
        uow.commit()
    for name in (unused, in_use, legacy):
        _age(grpc_server, root, name.removesuffix(".upload"), old)
    _age_file(root / orphan, old)

    assert upload_sweep.sweep(engine) == 2
    assert {name: (root / name).exists() for name in (unused, in_use, fresh, orphan, legacy)} == {
        unused: False,
        in_use: True,
        fresh: True,
        orphan: False,
        legacy: True,
    }
    assert from_upload(alice, unused) == not_found(unused)
    assert from_upload(alice, fresh)[0] == 201
    # Nothing more to do.
    assert upload_sweep.sweep(engine) == 0


def test_a_file_without_a_row_is_kept_while_a_sources_settings_cannot_be_read(
    grpc_server: RunningServer, engine: EngineContext, settings: Settings, small_mbox: bytes
) -> None:
    """Such a file is removed only if no source names it; a source whose sealed
    settings do not open (another ENCRYPTION_KEY, a damaged row) might."""
    orphan = settings.upload_root / f"{uuid.uuid4()}.upload"
    orphan.write_bytes(small_mbox)
    _age_file(orphan, engine.upload_ttl + timedelta(hours=1))
    unreadable = str(uuid.uuid4())
    with grpc_server.database.unit_of_work() as uow:
        owner = uow.session.scalars(select(User.id).limit(1)).one()
        uow.session.add(
            IngestionSource(
                id=unreadable,
                owner_id=owner,
                name="unreadable",
                provider="mbox_import",
                status="paused",
                sealed_config=b"not sealed",
            )
        )
        uow.commit()
    try:
        assert upload_sweep.sweep(engine) == 0
        assert orphan.exists()
    finally:
        with grpc_server.database.unit_of_work() as uow:
            uow.session.execute(delete(IngestionSource).where(IngestionSource.id == unreadable))
            uow.commit()
    assert upload_sweep.sweep(engine) == 1
    assert not orphan.exists()
