"""google_workspace end to end: REST -> Envoy -> gRPC -> Dramatiq worker processes ->
archive, against the session's fake of Google's token endpoint, Directory and Gmail
(tests/support/fake_google.py), which the server and the workers reach through
GOOGLE_API_ENDPOINT.

The fake is shared by the whole test run: every test reads a domain of its own
(`GoogleDomain`: its users' addresses, a service account of its own, and the
source's includeUsers), so no test sees another's mail or revokes another's
delegation. The imports run at the engine's real pace: the shared quota of
250 units/s a user (5 a message: 50 messages/s, after a burst of 20).

Every count is exact, per user, as the run's mailboxes report it; every archived
byte is compared with the corpus message the fake served; and every response body
the tests received is searched for the domain's key when the test ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ingestion_grpc.engine.context import EngineContext
from ingestion_grpc.jobs.worker import worker_command
from ingestion_grpc.providers.google_api import DIRECTORY_SCOPE, GMAIL_SCOPE
from tests.support import workers
from tests.support.conformance_google import PROVIDER, GoogleDomain
from tests.support.fake_google import FakeGoogle, Logged
from tests.support.rest import RECEIVED_BODIES, Rest
from tests.support.sources import (
    archived,
    create_source,
    kill_mid_run,
    latest_run,
    mid_run,
    revived_by_watchdog,
    runs,
    settled,
)
from tests.support.workers import Worker

NESTED = "Projects/2024"
NON_ASCII = "Données/Été"
# The loggers whose DEBUG lines the leak test reads (google-auth, the API client,
# the HTTP layers, ours).
LIBRARY_LOGGERS = [
    "",
    "google",
    "google.auth",
    "google_auth_httplib2",
    "googleapiclient",
    "httplib2",
    "urllib3",
    "ingestion_grpc",
]


@pytest.fixture
def new_domain(fake_google: FakeGoogle) -> Iterator[Callable[[], GoogleDomain]]:
    """`new_domain()`: a domain of this test's own; once the test is over, no response
    body received so far holds its key or a token."""
    domains: list[GoogleDomain] = []

    def new() -> GoogleDomain:
        domains.append(GoogleDomain(fake_google))
        return domains[-1]

    yield new
    bodies = [body.decode("utf-8", "replace") for body in RECEIVED_BODIES]
    for domain in domains:
        assert_no_secret(domain, bodies)


def assert_no_secret(domain: GoogleDomain, texts: list[str]) -> None:
    for secret in domain.secrets():
        for text in texts:
            assert secret not in text, "a credential of the domain leaked"


def run_mailboxes(client: Rest, source_id: str, run_id: str) -> dict[str, dict]:
    """The run's mailboxes by display name (the per-mailbox progress an admin reads)."""
    response = client.get(f"/v1/ingestion-sources/{source_id}/sync-sessions/{run_id}/mailboxes")
    assert response.status_code == 200, response.text
    return {m["displayName"]: m for m in response.json()["mailboxes"]}


def assert_archive(client: Rest, source_id: str, domain: GoogleDomain, every: int = 1) -> None:
    """The archive holds exactly the domain's expected messages, user by user, each
    once with its folder paths, and (every `every`th row) the corpus bytes."""
    rows = archived(client, source_id)
    names = {
        m["mailbox"]: name
        for name, m in run_mailboxes(client, source_id, latest_run(client, source_id)["id"]).items()
    }
    got: dict[str, dict[str, set[str]]] = {}
    for row in rows:
        box = got.setdefault(names[row["mailbox"]], {})
        assert row["sha256"] not in box, "a message is archived twice in one mailbox"
        box[row["sha256"]] = set(row["folderPaths"])
    assert got == {user: mail for user, mail in domain.expected.items() if mail}
    for row in rows[::every]:
        raw = client.get(f"/v1/archived-emails/{row['id']}/raw")
        assert raw.status_code == 200
        assert raw.content == domain.raw[row["sha256"]]


def calls(fake: FakeGoogle, since: int, email: str, api: str) -> list[Logged]:
    """The fake's answers to `api` as `email` after the first `since` log entries."""
    return [e for e in fake.log[since:] if e.api == api and e.email.lower() == email.lower()]


def downloaded(fake: FakeGoogle, since: int, email: str) -> list[str]:
    """The message ids `email`'s messages.get asked for after `since` log entries."""
    return [e.path.rsplit("/", 1)[-1] for e in calls(fake, since, email, "messages.get")]


def post_run(client: Rest, source_id: str, kind: str) -> str:
    """POST .../import or .../sync; the new run's id once it is over."""
    response = client.post(f"/v1/ingestion-sources/{source_id}/{kind}")
    assert response.status_code == 202, response.text
    run_id: str = response.json()["syncSessionId"]
    settled(client, source_id)
    assert latest_run(client, source_id)["id"] == run_id
    return run_id


# --- a whole domain -------------------------------------------------------------------


def test_a_domain_is_archived_user_by_user_byte_for_byte_with_labels_as_folders(
    admin: Rest,
    fake_google: FakeGoogle,
    new_domain: Callable[[], GoogleDomain],
    start_worker: Callable[[], Worker],
) -> None:
    google, domain = fake_google, new_domain()
    users = [domain.user(f"user{n}") for n in range(8)]
    domain.add(users[0], 6)
    domain.add(users[0], 3, ["INBOX", "UNREAD", "CATEGORY_PERSONAL"])  # state labels: no folders
    domain.add(users[1], 8, ["SENT"], ["SENT"])
    domain.add(users[1], 2, ["DRAFT"], ["DRAFT"])
    projects = google.add_label(users[2], NESTED)
    domain.add(users[2], 5, [projects], [NESTED])
    # Several labels: one archived message with every label as a folder path.
    domain.add(users[2], 4, ["INBOX", projects, "IMPORTANT"], ["INBOX", NESTED])
    accents = google.add_label(users[3], NON_ASCII)
    domain.add(users[3], 6, [accents, "STARRED"], [NON_ASCII])
    domain.add(users[4], 5, ["UNREAD", "STARRED"], ["All Mail"])  # no folder-like label
    domain.add(users[4], 4)
    domain.add(users[5], 7)
    # Spam and Trash are left out unless includeSpamTrash: never downloaded.
    left_out = domain.add(users[5], 2, ["SPAM"], None) + domain.add(
        users[5], 2, ["TRASH", "INBOX"], None
    )
    gone = domain.add(users[6], 12)[4]
    domain.vanish(gone)  # deleted between list and get
    failing = domain.add(users[7], 15)[9]
    domain.fail(failing)  # 400 failedPrecondition (Open Archiver's #441): not the mailbox's end
    domain.user("suspended", suspended=True)
    domain.user("nogmail", gmail=False)
    forbidden = domain.user("forbidden")
    google.fail_next(1, 403, reason="forbidden", api="users.getProfile", email=forbidden)
    del domain.expected[forbidden]
    domain.skipped[forbidden] = "HTTP 403 forbidden"
    start_worker()

    source = create_source(admin, "google domain", PROVIDER, domain.config())
    assert source["status"] == "importing"
    done = settled(admin, source["id"])
    assert done["status"] == "active", done
    total = sum(len(mail) for mail in domain.expected.values())
    assert total == 75
    run = latest_run(admin, source["id"])
    assert (run["kind"], run["status"]) == ("import", "completed")
    assert (run["mailboxesTotal"], run["mailboxesDone"], run["mailboxesSkipped"]) == (11, 8, 3)
    assert (run["messagesFetched"], run["messagesArchived"]) == (total, total)
    assert (run["messagesSkipped"], run["messagesFailed"]) == (1, 1)
    assert "3 skipped" in done["lastSyncStatusMessage"]

    mailboxes = run_mailboxes(admin, source["id"], run["id"])
    assert set(mailboxes) == set(domain.expected) | set(domain.skipped)
    for email, mail in domain.expected.items():
        box = mailboxes[email]
        assert box["state"] == "done", box
        assert box["messagesArchived"] == box["messagesFetched"] == len(mail)
        assert box["messagesSkipped"] == (1 if email == users[6] else 0)
        assert box["messagesFailed"] == (1 if email == users[7] else 0)
    for email, reason in domain.skipped.items():
        assert mailboxes[email]["state"] == "skipped"
        assert reason in mailboxes[email]["errorMessage"]
        assert mailboxes[email]["messagesFetched"] == 0
    assert_archive(admin, source["id"], domain)
    # One raw get per message listed, and none for what is in Spam or Trash.
    for email in users:
        listed = [i for i, (user, _) in domain.messages.items() if user == email]
        wanted = sorted(set(listed) - set(left_out))
        assert sorted(downloaded(google, 0, email)) == wanted


def test_sync_archives_exactly_the_new_mail_and_the_new_labels(
    admin: Rest,
    fake_google: FakeGoogle,
    new_domain: Callable[[], GoogleDomain],
    start_worker: Callable[[], Worker],
) -> None:
    google, domain = fake_google, new_domain()
    alice, bob, carol = (domain.user(name) for name in ("alice", "bob", "carol"))
    failing = domain.add(alice, 10)[2]
    domain.fail(failing)
    bobs = domain.add(bob, 10)
    domain.add(carol, 8)
    trashed = domain.add(carol, 1, ["TRASH", "INBOX"], None)[0]
    start_worker()
    source = create_source(admin, "google sync", PROVIDER, domain.config())
    assert settled(admin, source["id"])["status"] == "active"
    first = latest_run(admin, source["id"])
    assert (first["messagesArchived"], first["messagesFailed"]) == (27, 1)

    mark = len(google.log)
    domain.repair(failing)  # the failed message is fetched again by the next run
    new = domain.add(alice, 4) + domain.add(bob, 2, ["INBOX", "UNREAD"])
    later = google.add_label(bob, "Later")
    google.modify_labels(bob, bobs[0], add=[later])  # a new folder for an archived message
    domain.expected[bob][domain.messages[bobs[0]][1]].add("Later")
    google.modify_labels(bob, bobs[1], add=["STARRED"])  # a state label: nothing to do
    google.modify_labels(carol, trashed, remove=["TRASH"])  # restored from Trash: archived now
    domain.expected[carol][domain.messages[trashed][1]] = {"INBOX"}
    run_id = post_run(admin, source["id"], "sync")

    assert settled(admin, source["id"])["status"] == "active"
    run = latest_run(admin, source["id"])
    assert (run["kind"], run["status"]) == ("sync", "completed")
    assert (run["messagesArchived"], run["messagesAlreadyPresent"]) == (8, 1)
    assert (run["messagesSkipped"], run["messagesFailed"]) == (0, 0)
    mailboxes = run_mailboxes(admin, source["id"], run_id)
    assert {u: m["messagesArchived"] for u, m in mailboxes.items()} == {alice: 5, bob: 2, carol: 1}
    assert mailboxes[bob]["messagesAlreadyPresent"] == 1
    assert_archive(admin, source["id"], domain)
    # Exactly the new, the repaired and the restored messages were downloaded, once each.
    assert sorted(downloaded(google, mark, alice)) == sorted([failing, *new[:4]])
    assert sorted(downloaded(google, mark, bob)) == sorted(new[4:])
    assert downloaded(google, mark, carol) == [trashed]
    for user in (alice, bob, carol):  # a sync reads the history, it does not list again
        assert calls(google, mark, user, "messages.list") == []
        assert [e.status for e in calls(google, mark, user, "history.list")] == [200]


def test_an_expired_history_lists_the_user_again_and_downloads_only_the_new_mail(
    admin: Rest,
    fake_google: FakeGoogle,
    new_domain: Callable[[], GoogleDomain],
    start_worker: Callable[[], Worker],
) -> None:
    google, domain = fake_google, new_domain()
    alice, bob = domain.user("alice"), domain.user("bob")
    domain.add(alice, 12)
    domain.add(bob, 12)
    start_worker()
    source = create_source(admin, "google expired history", PROVIDER, domain.config())
    assert settled(admin, source["id"])["status"] == "active"

    google.expire_history(alice)  # Google kept alice's history for hours only
    new = domain.add(alice, 3) + domain.add(bob, 2)
    mark = len(google.log)
    run_id = post_run(admin, source["id"], "sync")
    assert settled(admin, source["id"])["status"] == "active"
    run = latest_run(admin, source["id"])
    assert (run["status"], run["messagesArchived"], run["messagesFailed"]) == ("completed", 5, 0)
    mailboxes = run_mailboxes(admin, source["id"], run_id)
    assert (mailboxes[alice]["messagesArchived"], mailboxes[bob]["messagesArchived"]) == (3, 2)
    # Listed again: what alice's archive held counts as present, and is not downloaded.
    assert mailboxes[alice]["messagesAlreadyPresent"] == 12
    assert [e.status for e in calls(google, mark, alice, "history.list")] == [404]
    assert calls(google, mark, alice, "messages.list")
    assert sorted(downloaded(google, mark, alice)) == sorted(new[:3])
    assert sorted(downloaded(google, mark, bob)) == sorted(new[3:])
    assert_archive(admin, source["id"], domain)

    # The next sync starts from the history id the new listing began at.
    newest = domain.add(alice, 1)
    mark = len(google.log)
    post_run(admin, source["id"], "sync")
    assert latest_run(admin, source["id"])["messagesArchived"] == 1
    assert [e.status for e in calls(google, mark, alice, "history.list")] == [200]
    assert calls(google, mark, alice, "messages.list") == []
    assert downloaded(google, mark, alice) == newest
    assert_archive(admin, source["id"], domain)


def test_a_second_import_adds_nothing_and_downloads_nothing(
    admin: Rest,
    fake_google: FakeGoogle,
    new_domain: Callable[[], GoogleDomain],
    start_worker: Callable[[], Worker],
) -> None:
    google, domain = fake_google, new_domain()
    users = [domain.user(f"user{n}") for n in range(3)]
    for email in users:
        label = google.add_label(email, NESTED)
        domain.add(email, 6)
        domain.add(email, 4, ["INBOX", label], ["INBOX", NESTED])
    start_worker()
    source = create_source(admin, "google reimport", PROVIDER, domain.config())
    assert settled(admin, source["id"])["status"] == "active"
    first = latest_run(admin, source["id"])
    assert first["messagesArchived"] == 30

    mark = len(google.log)
    run_id = post_run(admin, source["id"], "import")
    assert run_id != first["id"]
    assert settled(admin, source["id"])["status"] == "active"
    run = latest_run(admin, source["id"])
    assert (run["kind"], run["status"]) == ("import", "completed")
    assert (run["messagesFetched"], run["messagesArchived"]) == (0, 0)
    assert run["messagesAlreadyPresent"] == 30
    mailboxes = run_mailboxes(admin, source["id"], run_id)
    assert {u: m["messagesAlreadyPresent"] for u, m in mailboxes.items()} == dict.fromkeys(
        users, 10
    )
    for email in users:  # listed again, nothing downloaded
        assert calls(google, mark, email, "messages.list")
        assert downloaded(google, mark, email) == []
    assert_archive(admin, source["id"], domain)


# --- crashes and refusals ------------------------------------------------------------------


def test_a_worker_killed_mid_user_resumes_on_its_page_with_nothing_lost_or_doubled(
    admin: Rest,
    fake_google: FakeGoogle,
    new_domain: Callable[[], GoogleDomain],
    start_worker: Callable[[], Worker],
    engine: EngineContext,
) -> None:
    google, domain = fake_google, new_domain()
    alice, bob = domain.user("alice"), domain.user("bob")
    # 250 messages each take 5 s at the quota's 50 messages/s: the worker is
    # killed after the first batch of 50, long before the end.
    domain.add(alice, 250)
    domain.add(bob, 250)
    worker = start_worker()
    source = create_source(admin, "google killed", PROVIDER, domain.config())
    kill_mid_run(admin, source["id"], worker, 500)
    mark = len(google.log)
    run_id = latest_run(admin, source["id"])["id"]
    at_kill = {
        u: m["messagesArchived"] for u, m in run_mailboxes(admin, source["id"], run_id).items()
    }
    start_worker()
    assert revived_by_watchdog(admin, engine, source["id"])["status"] == "active"

    run = latest_run(admin, source["id"])
    assert (run["id"], run["status"], run["messagesArchived"]) == (run_id, "completed", 500)
    mailboxes = run_mailboxes(admin, source["id"], run_id)
    assert {u: m["messagesArchived"] for u, m in mailboxes.items()} == {alice: 250, bob: 250}
    assert_archive(admin, source["id"], domain, every=5)
    for email in (alice, bob):
        # What was archived before the kill is not downloaded again, and what was
        # downloaded but not yet committed is.
        assert len(downloaded(google, mark, email)) == 250 - at_kill[email]
        if at_kill[email]:
            # Past page 1 (the fake lists 10 ids a page): the new worker starts on
            # the cursor's page, not on the first page again.
            first = calls(google, mark, email, "messages.list")[0]
            assert first.query.get("pageToken"), "the import restarted from the first page"
    assert any(at_kill.values())


def test_revoked_delegation_mid_run_is_an_error_and_the_next_sync_recovers(
    admin: Rest,
    fake_google: FakeGoogle,
    new_domain: Callable[[], GoogleDomain],
    start_worker: Callable[[], Worker],
) -> None:
    google, domain = fake_google, new_domain()
    users = [domain.user(f"user{n}") for n in range(3)]
    for email in users:
        domain.add(email, 150)  # at least 2.6 s each at the quota: caught mid-way
    start_worker()
    source = create_source(admin, "google revoked", PROVIDER, domain.config())
    mid_run(admin, source["id"])
    google.revoke_delegation(domain.key)  # an admin removed the client from the console
    try:
        failed = settled(admin, source["id"])
    finally:
        google.restore_delegation(domain.key)
    assert failed["status"] == "error", failed
    message = failed["lastSyncStatusMessage"]
    assert "unauthorized_client" in message and "domain-wide delegation" in message
    assert DIRECTORY_SCOPE in message and GMAIL_SCOPE in message
    assert domain.key.client_id in message  # which client to grant the scopes to
    run = latest_run(admin, source["id"])
    assert run["status"] == "failed"
    for box in run_mailboxes(admin, source["id"], run["id"]).values():
        assert box["state"] == "failed"
        assert "domain-wide delegation" in box["errorMessage"]
    before = len(archived(admin, source["id"]))
    assert 0 < before < 450

    # Restored (above): the next sync carries on from every user's cursor.
    post_run(admin, source["id"], "sync")
    assert settled(admin, source["id"])["status"] == "active"
    sync = latest_run(admin, source["id"])
    assert (sync["kind"], sync["status"]) == ("sync", "completed")
    assert sync["messagesArchived"] == 450 - before
    assert sum(r["messagesArchived"] for r in runs(admin, source["id"])) == 450
    assert_archive(admin, source["id"], domain, every=5)


def test_the_key_is_in_no_response_no_server_log_line_and_no_worker_log(
    admin: Rest,
    fake_google: FakeGoogle,
    new_domain: Callable[[], GoogleDomain],
    environment: dict[str, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # google-auth stops "google" propagating unless someone configured it; configure it.
    monkeypatch.setattr(logging.getLogger("google"), "propagate", True)
    for name in LIBRARY_LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    google, domain, refused = fake_google, new_domain(), new_domain()
    alice = domain.user("alice")
    domain.fail(domain.add(alice, 8)[3])  # its failure is logged, with Gmail's reason
    # Dramatiq's CLI sets up logging before our actors module is imported, so the
    # worker's LOG_LEVEL has no effect there: its --verbose is what logs DEBUG lines.
    monkeypatch.setattr(
        workers, "worker_command", lambda threads: [*worker_command(threads), "--verbose"]
    )
    worker = Worker(environment, tmp_path / "debug.log").start()
    try:
        # Refused at create: delegation granted for one scope only.
        google.grant(refused.key, [DIRECTORY_SCOPE])
        response = admin.post(
            "/v1/ingestion-sources",
            json={"name": "refused", "provider": PROVIDER, "providerConfig": refused.config()},
        )
        assert response.status_code == 400
        assert "unauthorized_client" in response.json()["message"]

        source = create_source(admin, "google leak", PROVIDER, domain.config())
        assert settled(admin, source["id"])["status"] == "active"
        assert admin.get(f"/v1/ingestion-sources/{source['id']}").status_code == 200
        assert admin.get("/v1/ingestion-sources").status_code == 200
        run_mailboxes(admin, source["id"], latest_run(admin, source["id"])["id"])
        # Revoked: listing the users is refused, the error goes into the source.
        google.revoke_delegation(domain.key)
        try:
            admin.post(f"/v1/ingestion-sources/{source['id']}/sync")
            assert settled(admin, source["id"])["status"] == "error"
        finally:
            google.restore_delegation(domain.key)
        assert admin.get(f"/v1/ingestion-sources/{source['id']}/sync-sessions").status_code == 200
    finally:
        worker.stop()
    log = worker.log()
    assert "[DEBUG]" in log and "unauthorized_client" in log  # it did log, the refusal too
    assert any(r.name.startswith("google") for r in caplog.records)  # the libraries did
    texts = [log, caplog.text, *(str(vars(r)) for r in caplog.records)]
    texts += [body.decode("utf-8", "replace") for body in RECEIVED_BODIES]
    assert google.issued_tokens and google.assertions
    for one in (domain, refused):
        assert_no_secret(one, texts)
