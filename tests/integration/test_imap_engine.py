"""IMAP end to end: REST -> gRPC -> Dramatiq worker -> archive, against Dovecot.

Every count is exact and every archived byte is compared with what Dovecot
serves for the same message.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable

import pytest

from ingestion_grpc.engine.context import EngineContext
from ingestion_grpc.engine.scheduler import tick
from tests.support.corpora import HAM, SPAM, mbox_messages, numbered
from tests.support.dovecot import Dovecot
from tests.support.polling import wait_for
from tests.support.rest import Rest
from tests.support.workers import Worker

RUNNING = ("importing", "syncing")
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


def create_source(client: Rest, dovecot: Dovecot, email: str) -> dict:
    config = dovecot.provider_config(email, secure=True, allow_insecure_cert=True)
    response = client.post(
        "/v1/ingestion-sources",
        json={"name": email, "provider": "generic_imap", "providerConfig": config},
    )
    assert response.status_code == 201, response.text
    return response.json()


def settled(client: Rest, source_id: str, timeout: float = 180.0) -> dict:
    return wait_for(
        lambda: client.get(f"/v1/ingestion-sources/{source_id}").json(),
        lambda source: source["status"] not in RUNNING,
        timeout=timeout,
        what=f"source {source_id} to finish its run",
    )


def archived(client: Rest, source_id: str) -> list[dict]:
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


def latest_run(client: Rest, source_id: str) -> dict:
    return client.get(f"/v1/ingestion-sources/{source_id}/sync-sessions").json()[
        "syncSessions"
    ][0]


def by_folder(rows: list[dict]) -> dict[str, set[str]]:
    folders: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        for folder in row["folderPaths"]:
            folders[folder].add(row["sha256"])
    return dict(folders)


def assert_archive_matches_server(client: Rest, source_id: str, on_server: dict) -> list[dict]:
    rows = archived(client, source_id)
    assert len({r["sha256"] for r in rows}) == len(rows), "a message is archived twice"
    expected = {folder: set(messages) for folder, messages in on_server.items() if messages}
    assert by_folder(rows) == expected
    return rows


@pytest.fixture
def user(make_client: Callable[[str], Rest]) -> Rest:
    return make_client("user")


def test_import_sync_and_reimport(
    user: Rest, dovecot: Dovecot, start_worker: Callable[[], Worker]
) -> None:
    email = dovecot.new_user("engine")
    spam = mbox_messages(SPAM)
    dovecot.append(email, "INBOX", spam[:200])
    dovecot.append(email, "Archive/2002", spam[200:400])
    dovecot.append(email, NON_ASCII_FOLDER, spam[400:])
    start_worker()

    source = create_source(user, dovecot, email)
    done = settled(user, source["id"])
    assert done["status"] == "active", done
    on_server = served(dovecot, email)
    assert {f: len(m) for f, m in on_server.items()} == {
        "INBOX": 200, "Archive/2002": 200, NON_ASCII_FOLDER: 100
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
        "import", 0, 508
    )
