"""REST helpers for end-to-end engine tests: create a source, wait for its run, read
back its archive and its runs."""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

from ingestion_grpc.crypto import CredentialCipher
from ingestion_grpc.db.models import IngestionSource, User
from ingestion_grpc.db.session import Database
from ingestion_grpc.engine.context import EngineContext
from ingestion_grpc.engine.scheduler import tick
from tests.support.polling import wait_for
from tests.support.rest import Rest
from tests.support.workers import Worker

RUNNING = ("importing", "syncing")


def stored_source(database: Database, cipher: CredentialCipher, name: str, status: str) -> str:
    """An mbox source of a new owner, written straight to the database (for tests of
    the catalog and the sweeps); its settings are sealed like the API seals them, so
    every part that reads all sources (the upload sweep) can read this one."""
    with database.unit_of_work() as uow:
        owner = User(
            email=f"{name}-{uuid.uuid4().hex[:8]}@example.com", password_hash="-", role="user"
        )
        uow.session.add(owner)
        uow.session.flush()
        source_id = str(uuid.uuid4())
        uow.session.add(
            IngestionSource(
                id=source_id,
                owner_id=owner.id,
                name=name,
                provider="mbox_import",
                status=status,
                sealed_config=cipher.seal({}, bound_to=source_id),
            )
        )
        uow.commit()
        return source_id


def create_source(client: Rest, name: str, provider: str, config: dict[str, Any]) -> dict:
    """POST a new source; it must be created (201)."""
    response = client.post(
        "/v1/ingestion-sources",
        json={"name": name, "provider": provider, "providerConfig": config},
    )
    assert response.status_code == 201, response.text
    return response.json()


def settled(client: Rest, source_id: str, timeout: float = 180.0) -> dict:
    """The source once its run is over (any status but importing / syncing)."""
    return wait_for(
        lambda: client.get(f"/v1/ingestion-sources/{source_id}").json(),
        lambda source: source["status"] not in RUNNING,
        timeout=timeout,
        what=f"source {source_id} to finish its run",
    )


def archived(client: Rest, source_id: str) -> list[dict]:
    """Every archived-email row of the source, all pages."""
    rows: list[dict] = []
    token = ""
    while True:
        page = client.get(
            f"/v1/ingestion-sources/{source_id}/archived-emails?pageSize=1000&pageToken={token}"
        ).json()
        rows += page["archivedEmails"]
        token = page["nextPageToken"]
        if not token:
            assert page["totalSize"] == len(rows)
            return rows


def runs(client: Rest, source_id: str) -> list[dict]:
    """The source's sync sessions, newest first."""
    response = client.get(f"/v1/ingestion-sources/{source_id}/sync-sessions")
    assert response.status_code == 200, response.text
    sessions: list[dict] = response.json()["syncSessions"]
    return sessions


def latest_run(client: Rest, source_id: str) -> dict:
    return runs(client, source_id)[0]


def mid_run(client: Rest, source_id: str, timeout: float = 60.0) -> dict:
    """The latest run once it has archived its first batch."""
    return wait_for(
        lambda: (runs(client, source_id) or [{"messagesArchived": 0}])[0],
        lambda run: run["messagesArchived"] > 0,
        timeout=timeout,
        what="the import to archive its first batch",
    )


def by_folder(rows: list[dict]) -> dict[str, set[str]]:
    """{folder path: the sha256 of every row filed there}."""
    folders: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        for folder in row["folderPaths"]:
            folders[folder].add(row["sha256"])
    return dict(folders)


def kill_mid_run(client: Rest, source_id: str, worker: Worker, total: int) -> int:
    """SIGKILL `worker` once the run has archived its first batch; what it had archived."""
    mid_run(client, source_id)
    worker.kill()
    stopped_at: int = latest_run(client, source_id)["messagesArchived"]
    assert 0 < stopped_at < total
    assert client.get(f"/v1/ingestion-sources/{source_id}").json()["status"] == "importing"
    return stopped_at


def revived_by_watchdog(client: Rest, engine: EngineContext, source_id: str) -> dict:
    """Tick the scheduler until the run is over; the source once settled.

    The watchdog finds a dead worker's mailbox once its heartbeat is older than
    STALE_RUN_AFTER (3 s in tests) and sends it again; a live worker resumes it.
    """
    wait_for(
        lambda: (tick(engine), latest_run(client, source_id))[1],
        lambda run: run["status"] != "running",
        timeout=120,
        what="the watchdog to revive the run",
    )
    return settled(client, source_id)
