"""microsoft_365 end to end: REST -> Envoy -> gRPC -> Dramatiq worker processes ->
archive, against the session's HTTPS fake of the Microsoft identity platform and of
Graph (tests/support/fake_graph.py), which the server and the workers reach through
MICROSOFT_AUTHORITY_HOST / MICROSOFT_GRAPH_ENDPOINT and trust through
REQUESTS_CA_BUNDLE.

The fake is shared by the whole test run: every test works in a domain of its own
(its users' UPNs, and the source's includeUsers) with an app registration of its own,
and marks its messages, so no test sees another's mail.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ingestion_grpc.engine.context import EngineContext
from ingestion_grpc.providers.graph_client import MAILBOX_CONCURRENCY
from tests.support.conformance import sha
from tests.support.corpora import HAM, SPAM, mbox_messages
from tests.support.fake_graph import FakeApp, FakeFolder, FakeGraph, FakeUser
from tests.support.rest import RECEIVED_BODIES, Rest
from tests.support.sources import (
    archived,
    create_source,
    kill_mid_run,
    latest_run,
    revived_by_watchdog,
    settled,
)
from tests.support.workers import Worker

# The declared pacing (16 requests/s per mailbox after a burst of 50, to stay within
# Graph's 10,000 requests per 10 minutes) would stretch these imports to minutes.
# Only the rate is raised: the 4 places per mailbox stay as declared, and are checked.
UNPACED = {"LIMIT_GRAPH_MAILBOX_REQUESTS": "1000"}

# Folders the mailboxes show, as a user sees them: nested, hidden, localised.
NESTED = "Inbox/Projekte/Größe 2002"
HIDDEN = "Sync Issues"
HIDDEN_CHILD = "Archive/Verborgen"
LOCALISED = "Boîte de réception/アーカイブ"


@dataclass
class Tenant:
    """One test's share of the fake: a domain, an app registration, and what it holds."""

    fake: FakeGraph
    domain: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:10]}.contoso.example")
    app: FakeApp | None = None
    # {UPN: {immutable id: (raw, folder path)}}, for every message on the server.
    mail: dict[str, dict[str, tuple[bytes, str]]] = field(default_factory=dict)
    users: dict[str, FakeUser] = field(default_factory=dict)
    _corpus: Iterator[bytes] = field(
        default_factory=lambda: iter(mbox_messages(HAM) + mbox_messages(SPAM))
    )

    def __post_init__(self) -> None:
        self.app = self.fake.add_app()

    @property
    def secret(self) -> str:
        assert self.app is not None
        return self.app.secret

    def config(self, **extra: Any) -> dict[str, Any]:
        assert self.app is not None
        return {
            "tenantId": self.fake.tenant_id,
            "clientId": self.app.client_id,
            "clientSecret": self.app.secret,
            "includeUsers": [f"*@{self.domain}"],
            **extra,
        }

    def user(self, name: str, **options: Any) -> FakeUser:
        upn = f"{name}@{self.domain}"
        user = self.fake.add_user(upn, **options)
        self.users[upn] = user
        if user.has_mailbox:
            self.mail[upn] = {}
        return user

    def guest(self, name: str) -> FakeUser:
        return self.user(f"{name}_partner.example#EXT#", guest=True)

    def folder(self, user: FakeUser, path: str, *, hidden: bool = False) -> FakeFolder:
        parent, _, name = path.rpartition("/")
        return self.fake.add_folder(user, name, parent or None, hidden=hidden)

    def add(self, user: FakeUser, path: str, count: int) -> list[str]:
        """`count` new messages in the folder, each unique to this test."""
        raws = [
            b"X-Test-Tenant: %s\r\n" % self.domain.encode() + next(self._corpus)
            for _ in range(count)
        ]
        ids = self.fake.add_messages(user, user.folder(path), raws)
        self.mail[user.upn].update({i: (raw, path) for i, raw in zip(ids, raws, strict=True)})
        return ids

    def move(self, user: FakeUser, message_id: str, path: str) -> None:
        self.fake.move_message(user, message_id, user.folder(path))

    def downloads(self) -> Counter[str]:
        """$value requests per message id, over this tenant's users."""
        counts: Counter[str] = Counter()
        for user in self.users.values():
            counts.update(self.fake.value_requests(user))
        return counts


@pytest.fixture
def tenant(fake_graph: FakeGraph) -> Iterator[Tenant]:
    latency = fake_graph.latency
    yield Tenant(fake_graph)
    fake_graph.latency = latency


@pytest.fixture
def workers(environment: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """`workers(threads=2, **environment)` starts a worker process (unpaced, see
    UNPACED); all are stopped after the test."""
    started: list[Worker] = []

    def start(threads: int = 2, **extra: str) -> Worker:
        env = {**environment, **UNPACED, **extra}
        worker = Worker(env, tmp_path / f"worker-{len(started)}.log", threads=threads).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def run_mailboxes(client: Rest, source_id: str, run_id: str) -> dict[str, dict[str, Any]]:
    """The run's mailboxes by display name (the UPN)."""
    response = client.get(
        f"/v1/ingestion-sources/{source_id}/sync-sessions/{run_id}/mailboxes?pageSize=1000"
    )
    assert response.status_code == 200, response.text
    return {m["displayName"]: m for m in response.json()["mailboxes"]}


def archive_by_mailbox(client: Rest, source_id: str) -> dict[str, dict[str, set[str]]]:
    """{UPN: {sha256: folder paths}} of the source's archive, each message once."""
    names = {
        m["mailbox"]: name
        for name, m in run_mailboxes(client, source_id, latest_run(client, source_id)["id"]).items()
    }
    got: dict[str, dict[str, set[str]]] = {}
    for row in archived(client, source_id):
        box = got.setdefault(names[row["mailbox"]], {})
        assert row["sha256"] not in box, "a message is archived twice in one mailbox"
        box[row["sha256"]] = set(row["folderPaths"])
    return got


def expected_archive(
    tenant: Tenant, paths: dict[str, set[str]] | None = None
) -> dict[str, dict[str, set[str]]]:
    """What the archive must hold: every message the tenant's mailboxes ever held,
    in the folder it arrived in (or, by message id, in `paths`)."""
    paths = paths or {}
    return {
        upn: {sha(raw): paths.get(mid, {path}) for mid, (raw, path) in mail.items()}
        for upn, mail in tenant.mail.items()
        if mail
    }


def trigger(client: Rest, source_id: str, what: str) -> dict[str, Any]:
    response = client.post(f"/v1/ingestion-sources/{source_id}/{what}")
    assert response.status_code == 202, response.text
    done = settled(client, source_id)
    run = latest_run(client, source_id)
    assert run["id"] == response.json()["syncSessionId"]
    return done


# --- the tests ---------------------------------------------------------------------------


def test_a_tenant_is_archived_exactly_and_a_second_import_adds_and_downloads_nothing(
    admin: Rest, tenant: Tenant, workers: Callable[..., Worker]
) -> None:
    fake = tenant.fake
    alice = tenant.user("alice")
    for path, hidden in (
        ("Inbox/Projekte", False),
        (NESTED, False),
        (HIDDEN, True),
        (HIDDEN_CHILD, True),
        ("Boîte de réception", False),
        (LOCALISED, False),
    ):
        tenant.folder(alice, path, hidden=hidden)
    for path, count in (
        ("Inbox", 12),
        ("Inbox/Projekte", 3),
        (NESTED, 4),
        (HIDDEN, 2),
        (HIDDEN_CHILD, 2),
        (LOCALISED, 3),
        ("Junk Email", 3),  # archived like any folder: auditors ask for it
        ("Deleted Items", 3),
    ):
        tenant.add(alice, path, count)
    bob = tenant.user("bob")
    tenant.add(bob, "Inbox", 230)  # several delta pages (the provider asks for 100)
    tenant.add(bob, "Sent Items", 5)
    for name in ("carol", "dave", "erin"):
        user = tenant.user(name)
        tenant.add(user, "Inbox", 6)
        tenant.add(user, "Archive", 2)
    tenant.user("frank")  # a mailbox with no mail: done, not skipped
    tenant.user("gina", mailbox=False)  # no Exchange Online licence
    guest = tenant.guest("hank")
    total = sum(len(mail) for mail in tenant.mail.values())

    workers()
    workers()
    source = create_source(admin, "m365 tenant", "microsoft_365", tenant.config())
    done = settled(admin, source["id"])
    assert done["status"] == "active", done
    run = latest_run(admin, source["id"])
    assert (run["kind"], run["status"]) == ("import", "completed")
    assert (run["messagesFetched"], run["messagesArchived"]) == (total, total)
    assert (run["messagesSkipped"], run["messagesFailed"]) == (0, 0)
    assert (run["mailboxesTotal"], run["mailboxesDone"], run["mailboxesSkipped"]) == (8, 6, 2)

    mailboxes = run_mailboxes(admin, source["id"], run["id"])
    readable = {upn: len(mail) for upn, mail in tenant.mail.items()}
    assert {n: m["state"] for n, m in mailboxes.items()} == {
        **dict.fromkeys(readable, "done"),
        f"gina@{tenant.domain}": "skipped",
        guest.upn: "skipped",
    }
    assert {n: mailboxes[n]["messagesArchived"] for n in readable} == readable
    assert "no Exchange Online mailbox" in mailboxes[f"gina@{tenant.domain}"]["errorMessage"]
    assert "guest account" in mailboxes[guest.upn]["errorMessage"]

    assert archive_by_mailbox(admin, source["id"]) == expected_archive(tenant)
    raws = {sha(raw): raw for mail in tenant.mail.values() for raw, _ in mail.values()}
    for row in archived(admin, source["id"]):
        response = admin.get(f"/v1/archived-emails/{row['id']}/raw")
        assert response.status_code == 200
        assert response.content == raws[row["sha256"]], row["folderPaths"]
    every_message = Counter({i: 1 for mail in tenant.mail.values() for i in mail})
    assert tenant.downloads() == every_message
    for user in tenant.users.values():
        stats = fake.stats(user)
        assert stats.peak_concurrency <= 4 and stats.throttled == 0, (user, stats)

    # A second import lists every folder again and asks the archive: nothing new,
    # nothing downloaded again.
    assert trigger(admin, source["id"], "import")["status"] == "active"
    again = latest_run(admin, source["id"])
    assert (again["kind"], again["status"]) == ("import", "completed")
    assert (again["messagesArchived"], again["messagesAlreadyPresent"]) == (0, total)
    assert tenant.downloads() == every_message
    assert archive_by_mailbox(admin, source["id"]) == expected_archive(tenant)


def test_a_sync_archives_exactly_the_new_mail_and_keeps_a_moved_message_once(
    admin: Rest, tenant: Tenant, workers: Callable[..., Worker]
) -> None:
    fake = tenant.fake
    alice, bob = tenant.user("alice"), tenant.user("bob")
    inbox = tenant.add(alice, "Inbox", 10)
    tenant.add(alice, "Archive", 3)
    tenant.add(alice, "Junk Email", 4)
    tenant.add(bob, "Inbox", 5)
    workers()
    source = create_source(admin, "m365 sync", "microsoft_365", tenant.config())
    assert settled(admin, source["id"])["status"] == "active"
    before = tenant.downloads()

    new = tenant.add(alice, "Inbox", 3)
    tenant.folder(alice, "Inbox/Neu · 2025")  # a folder created since the import
    new += tenant.add(alice, "Inbox/Neu · 2025", 2)
    moved = inbox[0]
    tenant.move(alice, moved, "Archive")
    fake.delete_message(alice, inbox[1])  # an archive keeps what it archived
    fake.expire_delta(alice.folder("Junk Email"))  # 410: listed again
    new += tenant.add(alice, "Junk Email", 1)
    fake.expire_delta(bob.folder("Inbox"), status=400, code="resyncRequired")
    new += tenant.add(bob, "Inbox", 1)

    assert trigger(admin, source["id"], "sync")["status"] == "active"
    run = latest_run(admin, source["id"])
    assert (run["kind"], run["status"]) == ("sync", "completed")
    assert (run["messagesFetched"], run["messagesArchived"]) == (len(new), len(new))
    # Seen again without a download: the moved message, Junk Email's 4 and bob's 5.
    assert run["messagesAlreadyPresent"] == 1 + 4 + 5
    mailboxes = run_mailboxes(admin, source["id"], run["id"])
    assert mailboxes[alice.upn]["messagesArchived"] == 6
    assert mailboxes[bob.upn]["messagesArchived"] == 1

    assert archive_by_mailbox(admin, source["id"]) == expected_archive(
        tenant, {moved: {"Inbox", "Archive"}}
    )
    # Only the new mail was downloaded, each message once: not the moved one, not
    # what the expired folders held.
    assert tenant.downloads() - before == Counter(dict.fromkeys(new, 1))
    assert tenant.downloads()[moved] == 1


def test_a_worker_killed_mid_folder_resumes_with_nothing_lost_or_doubled(
    admin: Rest,
    tenant: Tenant,
    workers: Callable[..., Worker],
    engine: EngineContext,
) -> None:
    fake = tenant.fake
    alice = tenant.user("alice")
    ids = tenant.add(alice, "Inbox", 500)  # 5 delta pages: batches of 100
    tenant.add(alice, "Sent Items", 20)  # read after Inbox (folders go by path)
    fake.latency = 0.02  # 4 in flight: ~200 messages/s, slow enough to be caught
    worker = workers()
    source = create_source(admin, "m365 kill", "microsoft_365", tenant.config())
    stopped_at = kill_mid_run(admin, source["id"], worker, 520)
    assert stopped_at < len(ids), "killed after Inbox was done: not mid-folder"
    # The places the killed worker held come back when their leases run out. Until
    # then the new worker would wait for them without a batch, hence without a
    # heartbeat, and the watchdog would send the mailbox again and again.
    workers()
    time.sleep(MAILBOX_CONCURRENCY.lease_seconds)
    assert revived_by_watchdog(admin, engine, source["id"])["status"] == "active"

    run = latest_run(admin, source["id"])
    assert (run["status"], run["messagesArchived"]) == ("completed", 520)
    assert archive_by_mailbox(admin, source["id"]) == expected_archive(tenant)
    # Resumed from the checkpoint: nothing was listed again as "already present",
    # and nothing archived before the kill was downloaded again.
    assert (run["messagesFetched"], run["messagesAlreadyPresent"]) == (520, 0)
    downloads = tenant.downloads()
    assert all(downloads[i] == 1 for i in ids[:stopped_at])
    assert set(downloads) == set(tenant.mail[alice.upn])


def test_two_worker_processes_on_one_mailbox_keep_at_most_four_requests_in_flight(
    admin: Rest, tenant: Tenant, workers: Callable[..., Worker]
) -> None:
    """Graph's 4 places belong to the mailbox (per app): two sources of one app on
    one mailbox, read by two worker processes at once, share them."""
    fake = tenant.fake
    alice = tenant.user("alice")
    inbox = tenant.add(alice, "Inbox", 120)
    archive = tenant.add(alice, "Archive", 120)
    fake.latency = 0.04
    # One job at a time per process, none waiting in a busy one's prefetch: while
    # one worker reads a mailbox, the other source's job goes to the other worker.
    for _ in range(2):
        workers(threads=1, dramatiq_queue_prefetch="1")
    sources = [
        create_source(admin, f"m365 {f}", "microsoft_365", tenant.config(includeFolders=[f]))
        for f in ("Inbox", "Archive")
    ]
    for source in sources:
        assert settled(admin, source["id"])["status"] == "active"
    assert archive_by_mailbox(admin, sources[0]["id"]) == {
        alice.upn: {sha(tenant.mail[alice.upn][i][0]): {"Inbox"} for i in inbox}
    }
    assert len(archived(admin, sources[1]["id"])) == len(archive)

    values = fake.requests_to(alice, "/$value")
    spans = []
    for ids in (set(inbox), set(archive)):
        times = [r.started for r in values if r.path.split("/")[-2] in ids]
        spans.append((min(times), max(times)))
    assert max(s[0] for s in spans) < min(s[1] for s in spans), "the reads did not overlap"
    stats = fake.stats(alice)
    assert stats.peak_concurrency == 4  # the places were used, and never one more
    assert stats.throttled == 0


def test_a_rotated_secret_errors_clearly_an_update_recovers_and_no_secret_leaks(
    admin: Rest,
    tenant: Tenant,
    workers: Callable[..., Worker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("msal", "urllib3", "requests", "ingestion_grpc"):
        caplog.set_level(logging.DEBUG, logger=name)
    fake = tenant.fake
    assert tenant.app is not None
    client_id = tenant.app.client_id
    alice = tenant.user("alice")
    tenant.add(alice, "Inbox", 3)
    worker = workers(LOG_LEVEL="DEBUG")  # msal's and urllib3's debug lines too
    tokens_before = set(fake.issued_tokens)
    old_secret = tenant.secret
    wrong = old_secret[:-6] + "XXXXXX"

    refused = admin.post(
        "/v1/ingestion-sources",
        json={
            "name": "m365 wrong secret",
            "provider": "microsoft_365",
            "providerConfig": tenant.config(clientSecret=wrong),
        },
    )
    assert refused.status_code == 400
    assert "the client secret is invalid or has expired" in refused.json()["message"]
    source = create_source(admin, "m365 rotated", "microsoft_365", tenant.config())
    assert settled(admin, source["id"])["status"] == "active"

    new_secret = fake.rotate_secret(client_id)
    fake.expire_tokens()  # the old secret's tokens run out
    tenant.add(alice, "Inbox", 2)
    failed = trigger(admin, source["id"], "sync")
    assert failed["status"] == "error"
    assert "the client secret is invalid or has expired" in failed["lastSyncStatusMessage"]
    assert latest_run(admin, source["id"])["status"] == "failed"

    path = f"/v1/ingestion-sources/{source['id']}"
    still_wrong = admin.put(path, json={"providerConfig": {"clientSecret": wrong}})
    assert still_wrong.status_code == 400
    fixed = admin.put(path, json={"providerConfig": {"clientSecret": new_secret}})
    assert fixed.status_code == 200, fixed.text
    assert trigger(admin, source["id"], "sync")["status"] == "active"
    assert latest_run(admin, source["id"])["messagesArchived"] == 2
    assert len(archived(admin, source["id"])) == 5

    tokens = set(fake.issued_tokens) - tokens_before
    assert len(tokens) >= 2  # the server's checks and the worker's imports, at least
    worker.stop()  # its log is complete
    haystacks = {
        "responses": b"\n".join(RECEIVED_BODIES).decode(errors="replace"),
        "server logs": caplog.text + "".join(repr(r.args) for r in caplog.records),
        "worker log": worker.log(),
    }
    # The libraries did log, at DEBUG, in both processes.
    assert "msal" in haystacks["server logs"] and "urllib3" in haystacks["worker log"]
    for where, text in haystacks.items():
        for value in (old_secret, new_secret, wrong, *tokens):
            assert value not in text, f"a secret or an access token appears in the {where}"
