"""The documented Ingestion API through Envoy: status codes, bodies, states."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
import redis
import requests
from sqlalchemy import func, update

from ingestion_grpc.db.models import IngestionSource, SyncSession
from ingestion_grpc.jobs import messages
from ingestion_grpc.server import RunningServer
from tests.support.fake_tenant import tenant_config
from tests.support.polling import wait_for
from tests.support.rest import Rest
from tests.support.services import REDIS_URL

SOURCE_FIELDS = {
    "id",
    "name",
    "provider",
    "status",
    "createdAt",
    "updatedAt",
    "lastSyncStartedAt",
    "lastSyncStatusMessage",
}


def assert_accepted(client: Rest, source_id: str, response: requests.Response) -> None:
    """202 with the documented message, and the id of the run it started."""
    assert response.status_code == 202, response.text
    runs = client.get(f"/v1/ingestion-sources/{source_id}/sync-sessions").json()["syncSessions"]
    assert response.json() == {
        "message": "Operation completed successfully.",
        "syncSessionId": runs[0]["id"],
    }
    assert runs[0]["status"] == "running"


def queued(namespace: str, source_id: str) -> list[str]:
    """Actor names of the messages waiting on the real Redis queue for a source."""
    client = redis.Redis.from_url(REDIS_URL)
    raw = client.hgetall(f"{namespace}:{messages.QUEUE}.msgs")
    client.close()
    names = []
    for body in raw.values():
        message = json.loads(body)
        if message["args"] == [source_id]:
            names.append(message["actor_name"])
    return sorted(names)


@pytest.fixture
def user(make_client: Callable[[str], Rest]) -> Rest:
    return make_client("user")


def create(client: Rest, **overrides: object) -> dict:
    """A source of the test-only tenant provider: CRUD is not about any real provider."""
    body = {"name": "Company tenant", "provider": "fake_tenant", "providerConfig": tenant_config()}
    body.update(overrides)
    response = client.post("/v1/ingestion-sources", json=body)
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture
def idle_source(user: Rest, grpc_server: RunningServer) -> Iterator[dict]:
    """A source whose initial import has finished (no worker runs in these tests,
    so the run is closed the way a worker would close it)."""
    source = create(user)
    with grpc_server.database.unit_of_work() as uow:
        uow.session.execute(
            update(SyncSession)
            .where(SyncSession.source_id == source["id"])
            .values(status="completed", finished_at=func.now(), listed_at=func.now())
        )
        uow.session.execute(
            update(IngestionSource)
            .where(IngestionSource.id == source["id"])
            .values(status="active", last_sync_finished_at=func.now())
        )
        uow.commit()
    yield user.get(f"/v1/ingestion-sources/{source['id']}").json()


def test_create_returns_201_with_exactly_the_documented_fields(
    user: Rest, queue_namespace: str
) -> None:
    source = create(user)
    assert set(source) == SOURCE_FIELDS
    assert source["name"] == "Company tenant"
    assert source["provider"] == "fake_tenant"
    assert source["status"] == "importing"
    assert source["lastSyncStatusMessage"] == "Import queued."
    assert source["lastSyncStartedAt"] >= source["createdAt"]
    assert source["createdAt"].endswith("Z")
    assert queued(queue_namespace, source["id"]) == [messages.IMPORT_SOURCE]


def test_list_is_a_bare_array_of_the_callers_sources(
    make_client: Callable[[str], Rest], admin: Rest
) -> None:
    alice, bob = make_client("user"), make_client("user")
    assert alice.get("/v1/ingestion-sources").json() == []
    first = create(alice, name="first")
    second = create(alice, name="second")
    theirs = create(bob, name="bob's")

    listed = alice.get("/v1/ingestion-sources")
    assert listed.status_code == 200
    assert [s["id"] for s in listed.json()] == [second["id"], first["id"]]
    everything = {s["id"] for s in admin.get("/v1/ingestion-sources").json()}
    assert {first["id"], second["id"], theirs["id"]} <= everything


def test_get_returns_the_source_and_404_for_unknown_or_foreign_ids(
    make_client: Callable[[str], Rest], admin: Rest
) -> None:
    alice, bob = make_client("user"), make_client("user")
    source = create(alice)
    got = alice.get(f"/v1/ingestion-sources/{source['id']}")
    assert got.status_code == 200
    assert got.json() == source | {"updatedAt": got.json()["updatedAt"]}

    foreign = bob.get(f"/v1/ingestion-sources/{source['id']}")
    missing = bob.get("/v1/ingestion-sources/00000000-0000-0000-0000-000000000000")
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json()["code"] == 5
    assert source["id"] in foreign.json()["message"]
    assert admin.get(f"/v1/ingestion-sources/{source['id']}").status_code == 200


def test_update_changes_name_and_pause_resume(user: Rest, queue_namespace: str) -> None:
    source = create(user)
    renamed = user.put(f"/v1/ingestion-sources/{source['id']}", json={"name": "Renamed"})
    assert renamed.status_code == 200
    assert renamed.json()["name"] == "Renamed"
    assert set(renamed.json()) == SOURCE_FIELDS

    paused = user.put(f"/v1/ingestion-sources/{source['id']}", json={"status": "paused"})
    assert paused.json()["status"] == "paused"
    # The initial import was interrupted before it finished: resuming continues it.
    resumed = user.put(f"/v1/ingestion-sources/{source['id']}", json={"status": "active"})
    assert resumed.json()["status"] == "importing"
    assert queued(queue_namespace, source["id"]) == [messages.IMPORT_SOURCE] * 2


def test_resuming_an_idle_source_makes_it_active(user: Rest, idle_source: dict) -> None:
    path = f"/v1/ingestion-sources/{idle_source['id']}"
    assert user.put(path, json={"status": "paused"}).json()["status"] == "paused"
    assert user.put(path, json={"status": "active"}).json()["status"] == "active"


@pytest.mark.parametrize("status", ["error", "importing", "syncing", "imported", "bogus"])
def test_update_refuses_engine_statuses(user: Rest, status: str) -> None:
    source = create(user)
    response = user.put(f"/v1/ingestion-sources/{source['id']}", json={"status": status})
    assert response.status_code == 400
    assert response.json()["details"][0]["fieldViolations"][0]["field"] == "status"


def test_update_to_another_provider_needs_its_complete_config(
    user: Rest, environment: dict[str, str]
) -> None:
    source = create(user)
    path = f"/v1/ingestion-sources/{source['id']}"
    missing = user.put(path, json={"provider": "mbox_import"})
    assert missing.status_code == 400
    assert "providerConfig" in missing.json()["message"]
    partial = user.put(
        path, json={"provider": "mbox_import", "providerConfig": {"uploadedFilePath": " "}}
    )
    assert partial.status_code == 400
    assert "providerConfig.uploadedFilePath" in partial.json()["message"]
    imports = Path(environment["DATA_DIR"]) / "imports"
    imports.mkdir(parents=True, exist_ok=True)
    (imports / "changed.mbox").write_bytes(b"From a\n\nhello\n")
    complete = {"localFilePath": "changed.mbox"}
    changed = user.put(path, json={"provider": "mbox_import", "providerConfig": complete})
    assert changed.status_code == 200, changed.text
    assert changed.json()["provider"] == "mbox_import"


def test_pause_returns_the_paused_source(user: Rest) -> None:
    source = create(user)
    response = user.post(f"/v1/ingestion-sources/{source['id']}/pause")
    assert response.status_code == 200
    assert response.json()["status"] == "paused"
    assert set(response.json()) == SOURCE_FIELDS


def test_import_is_accepted_once_and_queued(
    user: Rest, idle_source: dict, queue_namespace: str
) -> None:
    path = f"/v1/ingestion-sources/{idle_source['id']}/import"
    before = queued(queue_namespace, idle_source["id"])
    accepted = user.post(path)
    assert_accepted(user, idle_source["id"], accepted)
    assert user.get(f"/v1/ingestion-sources/{idle_source['id']}").json()["status"] == "importing"

    again = user.post(path)
    assert again.status_code == 409
    assert "already running" in again.json()["message"]
    assert queued(queue_namespace, idle_source["id"]) == sorted([*before, messages.IMPORT_SOURCE])


def test_sync_is_accepted_and_conflicts_while_running_or_paused(
    user: Rest, idle_source: dict, queue_namespace: str
) -> None:
    path = f"/v1/ingestion-sources/{idle_source['id']}/sync"
    assert_accepted(user, idle_source["id"], user.post(path))
    assert user.get(f"/v1/ingestion-sources/{idle_source['id']}").json()["status"] == "syncing"
    assert messages.SYNC_SOURCE in queued(queue_namespace, idle_source["id"])
    assert user.post(path).status_code == 409

    user.post(f"/v1/ingestion-sources/{idle_source['id']}/pause")
    paused = user.post(path)
    assert paused.status_code == 409
    assert "paused" in paused.json()["message"]


def test_concurrent_imports_start_exactly_one_run(
    user: Rest, idle_source: dict, queue_namespace: str
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    path = f"/v1/ingestion-sources/{idle_source['id']}/import"
    before = queued(queue_namespace, idle_source["id"]).count(messages.IMPORT_SOURCE)
    with ThreadPoolExecutor(8) as pool:
        codes = sorted(pool.map(lambda _: user.post(path).status_code, range(8)))
    assert codes == [202] + [409] * 7
    after = queued(queue_namespace, idle_source["id"]).count(messages.IMPORT_SOURCE)
    assert after == before + 1


def test_delete_is_refused_until_enabled_then_204(user: Rest, admin: Rest) -> None:
    source = create(user)
    path = f"/v1/ingestion-sources/{source['id']}"
    refused = user.delete(path)
    assert refused.status_code == 400
    assert refused.json()["message"] == "Deletion is disabled for this instance."
    assert user.get(path).status_code == 200

    assert admin.put("/v1/settings/system", json={"enableDeletion": True}).status_code == 200
    try:
        deleted = user.delete(path)
        assert deleted.status_code == 204
        assert deleted.content == b""
        assert user.get(path).status_code == 404
        assert user.delete(path).status_code == 404
    finally:
        admin.put("/v1/settings/system", json={"enableDeletion": False})


def test_a_delete_that_deadlocks_with_concurrent_work_is_run_again_and_succeeds(
    user: Rest, admin: Rest, database_url: str
) -> None:
    """Another transaction (a worker ending a run, say) holds the source's run and
    then wants the source while the delete holds the source and wants its runs:
    PostgreSQL aborts the delete, which is run again once the other has committed
    (it was a 500 before)."""
    source = create(user)
    path = f"/v1/ingestion-sources/{source['id']}"
    assert admin.put("/v1/settings/system", json={"enableDeletion": True}).status_code == 200
    try:
        with (
            psycopg.connect(database_url) as other,
            psycopg.connect(database_url, autocommit=True) as watcher,
        ):
            other.execute(
                "UPDATE sync_sessions SET heartbeat_at = now() WHERE source_id = %s",
                (source["id"],),
            )
            with ThreadPoolExecutor(1) as pool:
                deleting = pool.submit(user.delete, path)
                # The delete now holds the source row and waits for the run's row.
                wait_for(
                    # Not `other`: a transaction sees one snapshot of pg_stat_activity.
                    lambda: watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND query LIKE 'DELETE FROM ingestion_sources%'"
                    ).fetchone(),
                    lambda row: row is not None and row[0] == 1,
                    what="the delete to wait for the run's row",
                )
                other.execute(
                    "UPDATE ingestion_sources SET last_sync_status_message = 'x' WHERE id = %s",
                    (source["id"],),
                )
                other.commit()
                deleted = deleting.result(timeout=30)
        assert deleted.status_code == 204, deleted.text
        assert user.get(path).status_code == 404
    finally:
        admin.put("/v1/settings/system", json={"enableDeletion": False})


def test_settings_read_and_write(admin: Rest) -> None:
    assert admin.get("/v1/settings/system").json() == {"enableDeletion": False}
    assert admin.put("/v1/settings/system", json={"enableDeletion": True}).json() == {
        "enableDeletion": True
    }
    assert admin.put("/v1/settings/system", json={}).json() == {"enableDeletion": True}
    assert admin.put("/v1/settings/system", json={"enableDeletion": False}).json() == {
        "enableDeletion": False
    }
