"""GET /v1/audit-events through Envoy: who did what to sources, API keys, settings
and archived messages, for admins only, and never a secret in it."""

from __future__ import annotations

import mailbox
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import func, update

from ingestion_grpc.config import Settings
from ingestion_grpc.db.models import IngestionSource, SyncSession
from ingestion_grpc.server import RunningServer
from tests.integration.test_imap_sources_rest import imap_body
from tests.integration.test_sources_rest import create
from tests.support.conformance_google import GoogleDomain
from tests.support.corpora import SPAM, mbox_messages
from tests.support.dovecot import Dovecot
from tests.support.fake_google import FakeGoogle
from tests.support.rest import Rest
from tests.support.sources import archived, create_source, settled
from tests.support.workers import Worker

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
EVENT_FIELDS = {
    "id",
    "occurredAt",
    "actor",
    "action",
    "targetType",
    "targetId",
    "sourceId",
    "requestId",
    "details",
}


def pages(admin: Rest, **filters: str) -> list[requests.Response]:
    """Every page of the events matching the filters, as answered."""
    answers: list[requests.Response] = []
    token = ""
    while True:
        response = admin.get(
            "/v1/audit-events", params={**filters, "pageSize": 200, "pageToken": token}
        )
        assert response.status_code == 200, response.text
        assert set(response.json()) == {"auditEvents", "nextPageToken"}
        answers.append(response)
        token = response.json()["nextPageToken"]
        if not token:
            return answers


def events(admin: Rest, **filters: str) -> list[dict[str, Any]]:
    """Every event matching the filters, newest first."""
    return [event for page in pages(admin, **filters) for event in page.json()["auditEvents"]]


def trail_text(admin: Rest) -> str:
    """The whole trail as the API sends it."""
    return "\n".join(page.text for page in pages(admin))


def closed_runs(server: RunningServer, source_id: str) -> None:
    """Close the source's runs the way a worker would (no worker runs here)."""
    with server.database.unit_of_work() as uow:
        uow.session.execute(
            update(SyncSession)
            .where(SyncSession.source_id == source_id)
            .values(status="completed", finished_at=func.now(), listed_at=func.now())
        )
        uow.session.execute(
            update(IngestionSource)
            .where(IngestionSource.id == source_id)
            .values(status="active", last_sync_finished_at=func.now())
        )
        uow.commit()


@pytest.fixture
def deletion_enabled(admin: Rest) -> Iterator[None]:
    before = admin.get("/v1/settings/system").json()
    assert admin.put("/v1/settings/system", json={"enableDeletion": True}).status_code == 200
    yield
    assert admin.put("/v1/settings/system", json=before).status_code == 200


def test_every_change_of_a_source_is_recorded_with_who_when_and_the_request(
    make_client: Callable[[str], Rest],
    admin: Rest,
    grpc_server: RunningServer,
    deletion_enabled: None,
) -> None:
    user = make_client("user")
    source = create(user, name="audited")
    source_id = source["id"]
    path = f"/v1/ingestion-sources/{source_id}"
    closed_runs(grpc_server, source_id)
    assert user.put(path, json={"name": "renamed", "status": "active"}).status_code == 200
    assert user.post(f"{path}/import").status_code == 202
    closed_runs(grpc_server, source_id)
    assert user.post(f"{path}/sync").status_code == 202
    assert user.post(f"{path}/pause").status_code == 200
    assert user.delete(path).status_code == 204

    recorded = events(admin, sourceId=source_id)
    assert [e["action"] for e in recorded] == [
        "source.delete",
        "source.pause",
        "source.sync",
        "source.import",
        "source.update",
        "source.create",
    ]
    for event in recorded:
        assert set(event) == EVENT_FIELDS
        assert event["actor"]["email"] == user.email
        assert UUID.fullmatch(event["actor"]["userId"])
        assert event["actor"]["apiKeyId"] == ""
        assert (event["targetType"], event["targetId"]) == ("ingestion_source", source_id)
        assert event["occurredAt"].endswith("Z")
    # One request each, named by Envoy's x-request-id.
    assert len({e["requestId"] for e in recorded}) == 6
    assert all(UUID.fullmatch(e["requestId"]) for e in recorded)
    times = [e["occurredAt"] for e in recorded]
    assert times == sorted(times, reverse=True)
    details = {e["action"]: e["details"] for e in recorded}
    assert details["source.create"] == {
        "name": "audited",
        "provider": "fake_tenant",
        "syncSessionId": details["source.create"]["syncSessionId"],
    }
    assert details["source.update"] == {"name": "renamed", "status": "active"}
    assert details["source.delete"] == {"name": "renamed", "provider": "fake_tenant"}
    assert details["source.pause"] == {}
    assert UUID.fullmatch(details["source.sync"]["syncSessionId"])
    assert details["source.import"]["syncSessionId"] != details["source.sync"]["syncSessionId"]
    # The settings change of the fixture is there too, with who made it.
    change = events(admin, action="settings.update")[0]
    assert change["actor"]["email"] == "admin@example.com"
    assert change["targetType"] == "system_settings"
    assert change["details"]["enableDeletion"]["to"] is True


def test_a_refused_change_records_nothing(make_client: Callable[[str], Rest], admin: Rest) -> None:
    user = make_client("user")
    source = create(user)
    before = events(admin, sourceId=source["id"])
    renamed = user.put(f"/v1/ingestion-sources/{source['id']}", json={"name": ""})
    assert renamed.status_code == 400
    assert events(admin, sourceId=source["id"]) == before
    assert [e["action"] for e in before] == ["source.create"]


def test_api_keys_are_recorded_and_an_api_key_caller_is_named(
    make_client: Callable[[str], Rest], admin: Rest
) -> None:
    user = make_client("user")
    created = user.post("/v1/api-keys", json={"name": "ci key", "expiresInDays": 3})
    assert created.status_code == 201, created.text
    key = created.json()
    by_key = Rest(user.base_url, api_key=key["key"])
    source = create(by_key, name="made with a key")
    assert user.delete(f"/v1/api-keys/{key['id']}").status_code == 204

    key_events = [e for e in events(admin, action="api_key.create") if e["targetId"] == key["id"]]
    assert len(key_events) == 1
    assert key_events[0]["actor"]["email"] == user.email
    assert key_events[0]["details"] == {
        "name": "ci key",
        "expiresAt": key_events[0]["details"]["expiresAt"],
    }
    revoked = [e for e in events(admin, action="api_key.revoke") if e["targetId"] == key["id"]]
    assert [e["details"] for e in revoked] == [{"name": "ci key"}]
    [made] = events(admin, sourceId=source["id"])
    assert made["actor"]["apiKeyId"] == key["id"]
    assert made["actor"]["email"] == user.email
    # The key's secret is in no event.
    assert key["key"] not in trail_text(admin)


def test_a_raw_download_is_recorded(
    admin: Rest, settings: Settings, environment: dict[str, str], tmp_path: Path
) -> None:
    folder = settings.import_root / f"audit-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    box = mailbox.mbox(folder / "three.mbox")
    for raw in mbox_messages(SPAM)[:3]:
        box.add(raw)
    box.close()
    source = create_source(
        admin, "downloads", "mbox_import", {"localFilePath": str(folder / "three.mbox")}
    )
    worker = Worker(environment, tmp_path / "worker.log").start()
    try:
        assert settled(admin, source["id"])["status"] == "imported"
    finally:
        worker.stop()
    email = archived(admin, source["id"])[0]
    # Reading metadata is not a download; reading the bytes is.
    assert admin.get(f"/v1/archived-emails/{email['id']}").status_code == 200
    assert [e["action"] for e in events(admin, sourceId=source["id"])] == ["source.create"]
    raw = admin.get(f"/v1/archived-emails/{email['id']}/raw")
    assert raw.status_code == 200
    [download] = events(admin, action="archived_email.download", sourceId=source["id"])
    assert (download["targetType"], download["targetId"]) == ("archived_email", email["id"])
    assert download["actor"]["email"] == "admin@example.com"
    assert download["details"] == {"sha256": email["sha256"], "sizeBytes": len(raw.content)}
    # A message that does not exist is not a download.
    assert admin.get(f"/v1/archived-emails/{uuid.uuid4()}/raw").status_code == 404
    assert len(events(admin, action="archived_email.download", sourceId=source["id"])) == 1


def test_a_failed_sign_in_is_recorded_without_the_password(admin: Rest) -> None:
    email = f"nobody-{uuid.uuid4().hex[:8]}@example.com"
    password = "not-the-password-" + uuid.uuid4().hex
    refused = requests.post(
        f"{admin.base_url}/v1/auth/login", json={"email": email, "password": password}, timeout=10
    )
    assert refused.status_code == 401
    failed = [e for e in events(admin, action="auth.login_failed") if e["actor"]["email"] == email]
    assert len(failed) == 1
    assert failed[0]["actor"]["userId"] == ""
    assert failed[0]["details"] == {"reason": "invalid_credentials", "clientAddress": "127.0.0.1"}
    assert password not in trail_text(admin)
    # What is not an email address may be a password typed into the wrong field.
    typed = "hunter2-" + uuid.uuid4().hex
    assert (
        requests.post(
            f"{admin.base_url}/v1/auth/login", json={"email": typed, "password": "x"}, timeout=10
        ).status_code
        == 401
    )
    assert events(admin, action="auth.login_failed")[0]["actor"]["email"] == ""
    assert typed not in trail_text(admin)


def test_only_admins_read_the_trail(make_client: Callable[[str], Rest], admin: Rest) -> None:
    anonymous = requests.get(f"{admin.base_url}/v1/audit-events", timeout=10)
    assert anonymous.status_code == 401
    assert anonymous.json()["code"] == 16
    for role in ("user", "viewer"):
        refused = make_client(role).get("/v1/audit-events")
        assert refused.status_code == 403, role
        assert refused.json() == {
            "code": 7,
            "message": "This needs the read:audit permission.",
            "details": [],
        }
    key = admin.post("/v1/api-keys", json={"name": "audit reader", "expiresInDays": 1}).json()
    assert Rest(admin.base_url, api_key=key["key"]).get("/v1/audit-events").status_code == 200


def test_pages_follow_each_other_without_gaps_or_repeats(
    make_client: Callable[[str], Rest], admin: Rest
) -> None:
    user = make_client("user")
    ids = [create(user, name=f"paged {n}")["id"] for n in range(5)]
    everything = events(admin, action="source.create")
    mine = [e["targetId"] for e in everything if e["targetId"] in ids]
    assert mine == list(reversed(ids))
    seen: list[str] = []
    token = ""
    while True:
        page = admin.get(
            "/v1/audit-events",
            params={"action": "source.create", "pageSize": 2, "pageToken": token},
        ).json()
        assert len(page["auditEvents"]) <= 2
        seen += [e["id"] for e in page["auditEvents"]]
        token = page["nextPageToken"]
        if not token:
            break
    assert seen == [e["id"] for e in everything]
    by_actor = events(admin, actorUserId=everything[0]["actor"]["userId"])
    assert {e["targetId"] for e in by_actor} >= set(ids)
    bad = admin.get("/v1/audit-events", params={"pageToken": "not-a-token"})
    assert bad.status_code == 400
    assert bad.json()["details"][0]["fieldViolations"][0]["field"] == "pageToken"
    too_big = admin.get("/v1/audit-events", params={"pageSize": 1001})
    assert too_big.status_code == 400


def test_no_secret_reaches_the_trail(
    make_client: Callable[[str], Rest],
    admin: Rest,
    dovecot: Dovecot,
    fake_google: FakeGoogle,
) -> None:
    owner = make_client("user")
    mailbox_user = dovecot.new_user("audit")
    password = dovecot.password(mailbox_user)
    imap = owner.post("/v1/ingestion-sources", json=imap_body(dovecot, mailbox_user))
    assert imap.status_code == 201, imap.text
    # Given again in an update (a password change the check accepts).
    changed = owner.put(
        f"/v1/ingestion-sources/{imap.json()['id']}",
        json={"name": "imap renamed", "providerConfig": {"password": password}},
    )
    assert changed.status_code == 200, changed.text
    domain = GoogleDomain(fake_google)
    domain.user("alice")
    google = owner.post(
        "/v1/ingestion-sources",
        json={"name": "google", "provider": "google_workspace", "providerConfig": domain.config()},
    )
    assert google.status_code == 201, google.text

    trail = trail_text(admin)
    update_event = events(admin, sourceId=imap.json()["id"], action="source.update")[0]
    assert update_event["details"] == {"name": "imap renamed", "providerConfigFields": ["password"]}
    for secret in [password, *domain.secrets()]:
        assert secret not in trail, "a credential reached the audit trail"
