"""IMAP end to end: REST -> gRPC -> Dramatiq worker -> archive, against Dovecot.

Every count is exact and every archived byte is compared with what Dovecot
serves for the same message.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable

import pytest

from ingestion_grpc.engine.context import EngineContext
from tests.support.corpora import HAM, SPAM, mbox_messages, numbered
from tests.support.dovecot import Dovecot
from tests.support.polling import wait_for
from tests.support.rest import Rest
from tests.support.sources import (
    archived,
    by_folder,
    create_source,
    kill_mid_run,
    latest_run,
    mid_run,
    revived_by_watchdog,
    settled,
)
from tests.support.stacks import Stack
from tests.support.workers import Worker

NON_ASCII_FOLDER = "Entwürfe/Größe"


def served(dovecot: Dovecot, email: str) -> dict[str, dict[str, bytes]]:
    """{folder: {sha256: raw}} of everything the server holds for the user."""
    result: dict[str, dict[str, bytes]] = {}
    with dovecot.client(email) as imap:
        for flags, delimiter, name in imap.list_folders():
            if b"\\Noselect" in flags:
                continue
            imap.select_folder(name, readonly=True)
            uids = imap.search("ALL")
            folder = name.replace(delimiter.decode(), "/") if delimiter else name
            bodies = imap.fetch(uids, ["BODY.PEEK[]"]) if uids else {}
            result[folder] = {
                hashlib.sha256(data[b"BODY[]"]).hexdigest(): data[b"BODY[]"]
                for data in bodies.values()
            }
    return result


def create_imap_source(client: Rest, dovecot: Dovecot, email: str) -> dict:
    config = dovecot.provider_config(email, secure=True, allow_insecure_cert=True)
    return create_source(client, email, "generic_imap", config)


def assert_archive_matches_server(client: Rest, source_id: str, on_server: dict) -> list[dict]:
    rows = archived(client, source_id)
    assert len({r["sha256"] for r in rows}) == len(rows), "a message is archived twice"
    expected = {folder: set(messages) for folder, messages in on_server.items() if messages}
    assert by_folder(rows) == expected
    return rows


@pytest.fixture
def user(make_client: Callable[[str], Rest]) -> Rest:
    return make_client("user")


@pytest.mark.parametrize("stack", ["local", "s3"], indirect=True)
def test_import_sync_and_reimport(stack: Stack, dovecot: Dovecot) -> None:
    user, start_worker = stack.make_client("user"), stack.start_worker
    email = dovecot.new_user("engine")
    spam = mbox_messages(SPAM)
    dovecot.append(email, "INBOX", spam[:200])
    dovecot.append(email, "Archive/2002", spam[200:400])
    dovecot.append(email, NON_ASCII_FOLDER, spam[400:])
    start_worker()

    source = create_imap_source(user, dovecot, email)
    done = settled(user, source["id"])
    assert done["status"] == "active", done
    on_server = served(dovecot, email)
    assert {f: len(m) for f, m in on_server.items()} == {
        "INBOX": 200,
        "Archive/2002": 200,
        NON_ASCII_FOLDER: 100,
    }
    rows = assert_archive_matches_server(user, source["id"], on_server)
    everything = {sha: raw for messages in on_server.values() for sha, raw in messages.items()}
    for row in rows:
        raw = user.get(f"/v1/archived-emails/{row['id']}/raw")
        assert raw.status_code == 200
        assert raw.headers["content-type"] == "message/rfc822"
        assert raw.content == everything[row["sha256"]]
    run = latest_run(user, source["id"])
    assert (run["kind"], run["status"]) == ("import", "completed")
    assert (run["messagesFetched"], run["messagesArchived"]) == (500, 500)
    assert done["lastSyncStatusMessage"].startswith("Imported: 500 new messages archived")

    dovecot.append(email, "INBOX", spam[:5] and [b"X-New: 1\r\n" + m for m in spam[:5]])
    dovecot.append(email, "Neu", [b"X-New: 2\r\n" + m for m in spam[5:8]])
    assert user.post(f"/v1/ingestion-sources/{source['id']}/sync").status_code == 202
    assert settled(user, source["id"])["status"] == "active"
    assert_archive_matches_server(user, source["id"], served(dovecot, email))
    run = latest_run(user, source["id"])
    assert (run["kind"], run["messagesFetched"], run["messagesArchived"]) == ("sync", 8, 8)

    assert user.post(f"/v1/ingestion-sources/{source['id']}/import").status_code == 202
    assert settled(user, source["id"])["status"] == "active"
    assert len(archived(user, source["id"])) == 508
    run = latest_run(user, source["id"])
    assert (run["kind"], run["messagesArchived"], run["messagesAlreadyPresent"]) == (
        "import",
        0,
        508,
    )


def _big_mailbox(dovecot: Dovecot, email: str, copies: int = 2) -> int:
    """Enough mail that an import is still running when the test acts on it."""
    messages = numbered(mbox_messages(HAM), copies)
    dovecot.append(email, "INBOX", messages)
    return len(messages)


def test_pause_mid_import_then_resume_completes_without_duplicates(
    user: Rest, dovecot: Dovecot, start_worker: Callable[[], Worker]
) -> None:
    email = dovecot.new_user("pause")
    total = _big_mailbox(dovecot, email)
    start_worker()
    source = create_imap_source(user, dovecot, email)
    mid_run(user, source["id"])

    paused = user.post(f"/v1/ingestion-sources/{source['id']}/pause")
    assert paused.json()["status"] == "paused"
    run = wait_for(
        lambda: latest_run(user, source["id"]),
        lambda run: run["status"] == "paused",
        what="the run to stop at a batch boundary",
    )
    assert 0 < run["messagesArchived"] < total
    assert user.get(f"/v1/ingestion-sources/{source['id']}").json()["status"] == "paused"

    resumed = user.put(f"/v1/ingestion-sources/{source['id']}", json={"status": "active"})
    assert resumed.json()["status"] == "importing"
    assert settled(user, source["id"])["status"] == "active"
    final = latest_run(user, source["id"])
    assert final["id"] == run["id"], "resuming continues the same run"
    assert final["messagesArchived"] == total
    # Resumed from its checkpoint: at most the interrupted batch is read twice.
    assert final["messagesFetched"] < total + 500
    assert_archive_matches_server(user, source["id"], served(dovecot, email))


def test_a_killed_worker_is_replaced_and_the_import_resumes(
    user: Rest,
    dovecot: Dovecot,
    start_worker: Callable[[], Worker],
    engine: EngineContext,
) -> None:
    email = dovecot.new_user("sigkill")
    total = _big_mailbox(dovecot, email)
    worker = start_worker()
    source = create_imap_source(user, dovecot, email)
    kill_mid_run(user, source["id"], worker, total)
    start_worker()
    done = revived_by_watchdog(user, engine, source["id"])
    assert done["status"] == "active"
    final = latest_run(user, source["id"])
    assert final["messagesArchived"] == total
    assert final["messagesFetched"] < total + 500
    assert_archive_matches_server(user, source["id"], served(dovecot, email))


def test_uidvalidity_reset_rescans_without_duplicates(
    user: Rest, dovecot: Dovecot, start_worker: Callable[[], Worker]
) -> None:
    email = dovecot.new_user("uidvalidity")
    spam = mbox_messages(SPAM)
    dovecot.append(email, "INBOX", spam[:50])
    dovecot.append(email, "Archive", spam[50:80])
    start_worker()
    source = create_imap_source(user, dovecot, email)
    assert settled(user, source["id"])["status"] == "active"

    dovecot.set_uidvalidity(email, "INBOX", 4242)
    dovecot.append(email, "INBOX", [b"X-After-Reset: 1\r\n" + spam[80]])
    assert user.post(f"/v1/ingestion-sources/{source['id']}/sync").status_code == 202
    assert settled(user, source["id"])["status"] == "active"
    run = latest_run(user, source["id"])
    assert (run["messagesFetched"], run["messagesArchived"]) == (51, 1)
    assert run["messagesAlreadyPresent"] == 50
    assert_archive_matches_server(user, source["id"], served(dovecot, email))


def test_a_changed_password_is_an_error_until_fixed(
    user: Rest, dovecot: Dovecot, start_worker: Callable[[], Worker]
) -> None:
    email = dovecot.new_user("password")
    dovecot.append(email, "INBOX", mbox_messages(SPAM)[:10])
    start_worker()
    source = create_imap_source(user, dovecot, email)
    assert settled(user, source["id"])["status"] == "active"

    dovecot.set_password(email, "changed-on-the-server")
    assert user.post(f"/v1/ingestion-sources/{source['id']}/sync").status_code == 202
    failed = settled(user, source["id"])
    assert failed["status"] == "error"
    assert "authentication failed" in failed["lastSyncStatusMessage"]
    assert "changed-on-the-server" not in failed["lastSyncStatusMessage"]
    run = latest_run(user, source["id"])
    assert (run["status"], run["mailboxesFailed"]) == ("failed", 1)

    fixed = user.put(
        f"/v1/ingestion-sources/{source['id']}",
        json={"providerConfig": {"password": "changed-on-the-server"}},
    )
    assert fixed.status_code == 200
    dovecot.append(email, "INBOX", [b"X-Later: 1\r\n" + mbox_messages(SPAM)[10]])
    assert user.post(f"/v1/ingestion-sources/{source['id']}/sync").status_code == 202
    recovered = settled(user, source["id"])
    assert recovered["status"] == "active"
    assert latest_run(user, source["id"])["messagesArchived"] == 1
    assert len(archived(user, source["id"])) == 11


def test_deleting_a_source_removes_its_archive_and_unshared_blobs(
    user: Rest,
    admin: Rest,
    dovecot: Dovecot,
    start_worker: Callable[[], Worker],
    engine: EngineContext,
) -> None:
    # Marked, so that no other test's source holds the same bytes.
    marker = uuid.uuid4().hex.encode()
    spam = [b"X-Deletion-Test: " + marker + b"\r\n" + m for m in mbox_messages(SPAM)]
    first, second = dovecot.new_user("del-a"), dovecot.new_user("del-b")
    dovecot.append(first, "INBOX", spam[100:110])
    dovecot.append(second, "INBOX", spam[105:115])  # five messages in common
    start_worker()
    kept = create_imap_source(user, dovecot, second)
    doomed = create_imap_source(user, dovecot, first)
    for source in (kept, doomed):
        assert settled(user, source["id"])["status"] == "active"
    doomed_digests = {row["sha256"] for row in archived(user, doomed["id"])}
    shared = doomed_digests & {row["sha256"] for row in archived(user, kept["id"])}
    assert len(shared) == 5

    admin.put("/v1/settings/system", json={"enableDeletion": True})
    try:
        assert user.delete(f"/v1/ingestion-sources/{doomed['id']}").status_code == 204
    finally:
        admin.put("/v1/settings/system", json={"enableDeletion": False})
    assert user.get(f"/v1/ingestion-sources/{doomed['id']}/archived-emails").status_code == 404
    assert {d for d in doomed_digests if engine.blobs.exists(d)} == shared
    assert len(archived(user, kept["id"])) == 10


def test_the_scheduler_syncs_due_sources_once_per_tick(
    user: Rest, dovecot: Dovecot, engine: EngineContext, start_worker: Callable[[], Worker]
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import update

    from ingestion_grpc.db.models import IngestionSource
    from ingestion_grpc.engine.scheduler import schedule_due_syncs

    email = dovecot.new_user("scheduled")
    dovecot.append(email, "INBOX", mbox_messages(SPAM)[:3])
    start_worker()
    source = create_imap_source(user, dovecot, email)
    assert settled(user, source["id"])["status"] == "active"
    dovecot.append(email, "INBOX", [b"X-Scheduled: 1\r\n" + mbox_messages(SPAM)[3]])

    with engine.database.unit_of_work() as uow:
        uow.session.execute(
            update(IngestionSource)
            .where(IngestionSource.id == source["id"])
            .values(next_sync_at=IngestionSource.created_at)
        )
        uow.commit()
    # Several schedulers at once (several machines): one claim wins.
    with ThreadPoolExecutor(4) as pool:
        claims = [
            c
            for claimed in pool.map(lambda _: schedule_due_syncs(engine), range(4))
            for c in claimed
            if c == source["id"]
        ]
    assert claims == [source["id"]]
    assert settled(user, source["id"])["status"] == "active"
    run = latest_run(user, source["id"])
    assert (run["kind"], run["messagesArchived"]) == ("sync", 1)
    assert schedule_due_syncs(engine).count(source["id"]) == 0, "not due again yet"
