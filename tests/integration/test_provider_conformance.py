"""The provider conformance suite: the same promises checked for every provider,
through the whole stack (REST -> Envoy -> gRPC -> Dramatiq worker -> archive).

Every provider must give exact counts and the served bytes, archive nothing on a
second import, show its mailboxes on the run, and resume from its cursor after a
worker is SIGKILLed mid-mailbox with nothing lost or doubled. Providers of
tenants (several mailboxes, from a server) also must report unreadable mailboxes
as skipped, count messages gone or failing, skip the download of what is
archived, and keep to limits shared by every worker process.

A case says how to create its source, what the archive must then hold, and
(for the kill test) how to make a source big or slow enough to be caught mid-way.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ingestion_grpc.engine.context import EngineContext
from tests.integration.test_imap_engine import served
from tests.support.conformance import Case, Expected, sha
from tests.support.conformance_google import google_case
from tests.support.conformance_m365 import m365_case
from tests.support.corpora import ENRON_PST, HAM, SPAM, mbox_messages, numbered
from tests.support.dovecot import Dovecot
from tests.support.fake_tenant import FakeTenantServer
from tests.support.rest import Rest
from tests.support.sources import (
    archived,
    create_source,
    kill_mid_run,
    latest_run,
    revived_by_watchdog,
    settled,
)
from tests.support.workers import Worker

# --- the cases ------------------------------------------------------------------------


def tenant_case() -> Iterator[Case]:
    server = FakeTenantServer().start()
    ham, spam = mbox_messages(HAM), mbox_messages(SPAM)

    def config(big: bool) -> dict[str, Any]:
        server.users.clear()
        server.gone.clear()
        server.failing.clear()
        server.latency = 0.02 if big else 0.0
        prefix = uuid.uuid4().hex[:6]
        alice = server.add_user(f"{prefix}-a", "alice@tenant.test")
        for index, raw in enumerate(ham[: 400 if big else 30]):
            # Every third message carries two labels: one archived message, two folders.
            labels = ["Inbox", "Projects/2024"] if index % 3 == 0 else ["Inbox"]
            alice.messages[f"m{index:04d}"] = (raw, labels)
        if not big:
            bob = server.add_user(f"{prefix}-b", "bob@tenant.test")
            for index, raw in enumerate(spam[:20]):
                bob.messages[f"m{index:04d}"] = (raw, ["Junk"])
            server.gone.add("m0003")  # alice's m0003 too: gone for both
            server.failing.add("m0007")
            server.add_user(f"{prefix}-c", "carol@tenant.test", skip="no mail licence")
            server.add_user(f"{prefix}-d", "dave@tenant.test", refuse="suspended")
        return {"endpoint": server.url, "batchSize": 25}

    def expected(big: bool) -> Expected:
        mailboxes: dict[str, dict[str, set[str]]] = {}
        raw: dict[str, bytes] = {}
        skipped: dict[str, str] = {}
        for user in server.users.values():
            if user.skip or user.refuse:
                skipped[user.name] = user.skip or user.refuse
                continue
            kept = {
                mid: message
                for mid, message in user.messages.items()
                if mid not in server.gone and mid not in server.failing
            }
            mailboxes[user.name] = {sha(r): set(f) for r, f in kept.values()}
            raw.update({sha(r): r for r, _ in kept.values()})
        readable = len(server.users) - len(skipped)
        return Expected(
            mailboxes,
            raw,
            skipped,
            messages_skipped=0 if big else readable,
            messages_failed=0 if big else readable,
        )

    yield Case("fake_tenant", config, expected, downloads=lambda: len(server.record.downloads))
    server.stop()


def imap_case(dovecot: Dovecot) -> Iterator[Case]:
    state: dict[str, Any] = {}

    def config(big: bool) -> dict[str, Any]:
        email = dovecot.new_user("conformance")
        messages = numbered(mbox_messages(HAM), 2) if big else list(mbox_messages(SPAM)[:40])
        dovecot.append(email, "INBOX", messages[: len(messages) // 2])
        dovecot.append(email, "Archive/2002", messages[len(messages) // 2 :])
        state.update(email=email, messages=messages)
        return dovecot.provider_config(email, secure=True, allow_insecure_cert=True)

    def expected(big: bool) -> Expected:
        # What Dovecot serves (it stores CRLF line ends), folder by folder; the
        # same bytes in both folders are one message with both paths.
        folders: dict[str, set[str]] = {}
        raw: dict[str, bytes] = {}
        for folder, messages in served(dovecot, state["email"]).items():
            for digest, body in messages.items():
                folders.setdefault(digest, set()).add(folder)
                raw[digest] = body
        return Expected({state["email"]: folders}, raw)

    yield Case("generic_imap", config, expected)


def file_case(provider: str, import_root: Path) -> Iterator[Case]:
    state: dict[str, Any] = {}

    def config(big: bool) -> dict[str, Any]:
        name = f"{uuid.uuid4().hex[:8]}"
        if provider == "pst_import":
            path = import_root / f"{name}.pst"
            shutil.copyfile(ENRON_PST, path)
        else:
            path = import_root / f"{name}.mbox"
            messages = numbered(mbox_messages(HAM), 4) if big else list(mbox_messages(SPAM))
            path.write_bytes(b"".join(b"From conformance\n" + m + b"\n" for m in messages))
        state["path"] = path
        return {"localFilePath": path.name}

    def expected(big: bool) -> Expected:
        path: Path = state["path"]
        if provider == "pst_import":
            # Exact PST counts and bytes are the PST tests' business; here: 71, in 5 folders.
            return Expected({path.name: {}}, {})
        messages = list(mbox_messages(path))
        return Expected(
            {path.name: {sha(r): {path.name} for r in messages}}, {sha(r): r for r in messages}
        )

    yield Case(provider, config, expected)


CASES = [
    "fake_tenant",
    "generic_imap",
    "mbox_import",
    "pst_import",
    "google_workspace",
    "microsoft_365",
]
KILLABLE = ["fake_tenant", "mbox_import", "google_workspace", "microsoft_365"]


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest, environment: dict[str, str]) -> Iterator[Case]:
    import_root = Path(environment["DATA_DIR"]) / "imports"
    import_root.mkdir(parents=True, exist_ok=True)
    if request.param == "fake_tenant":
        yield from tenant_case()
    elif request.param == "generic_imap":
        yield from imap_case(request.getfixturevalue("dovecot"))
    elif request.param == "google_workspace":
        yield from google_case(request.getfixturevalue("fake_google"))
    elif request.param == "microsoft_365":
        yield from m365_case(request.getfixturevalue("fake_graph"))
    else:
        yield from file_case(request.param, import_root)


# --- the promises -----------------------------------------------------------------------


def assert_archive(client: Rest, source_id: str, expected: Expected, provider: str) -> None:
    rows = archived(client, source_id)
    if provider == "pst_import":
        assert len(rows) == 71
        assert len({r["sha256"] for r in rows}) == 71
        return
    mailboxes = client.get(
        f"/v1/ingestion-sources/{source_id}/sync-sessions/{latest_run(client, source_id)['id']}"
        "/mailboxes"
    ).json()["mailboxes"]
    names = {m["mailbox"]: m["displayName"] for m in mailboxes}
    got: dict[str, dict[str, set[str]]] = {}
    for row in rows:
        box = got.setdefault(names[row["mailbox"]], {})
        assert row["sha256"] not in box, "a message is archived twice in one mailbox"
        box[row["sha256"]] = set(row["folderPaths"])
    assert got == expected.mailboxes
    for row in rows[:: max(1, len(rows) // 25)]:  # the bytes of a sample, every mailbox
        raw = client.get(f"/v1/archived-emails/{row['id']}/raw").content
        assert raw == expected.raw[row["sha256"]]


def import_once(client: Rest, case: Case, big: bool = False) -> tuple[dict, Expected]:
    source = create_source(client, f"conformance {case.provider}", case.provider, case.config(big))
    return source, case.expected(big)


def test_an_import_archives_exactly_what_the_provider_serves(
    admin: Rest, case: Case, start_worker: Callable[[], Worker]
) -> None:
    start_worker()
    source, expected = import_once(admin, case)
    assert settled(admin, source["id"])["status"] in ("active", "imported")
    assert_archive(admin, source["id"], expected, case.provider)
    run = latest_run(admin, source["id"])
    assert run["status"] == "completed"
    if case.provider != "pst_import":
        assert run["messagesArchived"] == expected.total
        assert run["messagesSkipped"] == expected.messages_skipped
        assert run["messagesFailed"] == expected.messages_failed
        assert run["mailboxesSkipped"] == len(expected.skipped)
    mailboxes = admin.get(
        f"/v1/ingestion-sources/{source['id']}/sync-sessions/{run['id']}/mailboxes"
    ).json()["mailboxes"]
    states = {m["displayName"]: m["state"] for m in mailboxes}
    assert states == {
        **{name: "done" for name in expected.mailboxes},
        **{name: "skipped" for name in expected.skipped},
    }
    for mailbox in mailboxes:
        if mailbox["state"] == "skipped":
            assert expected.skipped[mailbox["displayName"]] in mailbox["errorMessage"]
        elif case.provider != "pst_import":
            assert mailbox["messagesArchived"] == len(expected.mailboxes[mailbox["displayName"]])


def test_a_second_import_adds_nothing(
    admin: Rest, case: Case, start_worker: Callable[[], Worker]
) -> None:
    start_worker()
    source, expected = import_once(admin, case)
    settled(admin, source["id"])
    first = latest_run(admin, source["id"])
    downloads = case.downloads() if case.downloads else 0
    response = admin.post(f"/v1/ingestion-sources/{source['id']}/import")
    assert response.status_code == 202, response.text
    assert response.json()["message"] == "Operation completed successfully."
    run_id = response.json()["syncSessionId"]
    settled(admin, source["id"])
    second = latest_run(admin, source["id"])
    assert second["id"] == run_id != first["id"]
    assert second["messagesArchived"] == 0
    assert second["messagesAlreadyPresent"] == first["messagesArchived"]
    assert_archive(admin, source["id"], expected, case.provider)
    if case.downloads is not None:
        # Known messages are not downloaded again: only the failing and gone ones are tried.
        tried = expected.messages_failed + expected.messages_skipped
        assert case.downloads() - downloads == tried


@pytest.mark.parametrize("case", KILLABLE, indirect=True)
def test_a_worker_killed_mid_mailbox_resumes_with_nothing_lost_or_doubled(
    admin: Rest,
    case: Case,
    start_worker: Callable[[], Worker],
    engine: EngineContext,
) -> None:
    worker = start_worker()
    source, expected = import_once(admin, case, big=True)
    kill_mid_run(admin, source["id"], worker, expected.total)
    start_worker()
    assert revived_by_watchdog(admin, engine, source["id"])["status"] in ("active", "imported")
    assert_archive(admin, source["id"], expected, case.provider)
    assert latest_run(admin, source["id"])["messagesArchived"] == expected.total


# --- what only tenants do ----------------------------------------------------------------


@pytest.fixture
def tenant() -> Iterator[FakeTenantServer]:
    server = FakeTenantServer().start()
    yield server
    server.stop()


def tenant_users(server: FakeTenantServer, users: int, per_user: int) -> list[bytes]:
    ham = numbered(mbox_messages(HAM), 1)
    prefix = uuid.uuid4().hex[:6]
    for u in range(users):
        user = server.add_user(f"{prefix}-{u}", f"user{u}@tenant.test")
        for m in range(per_user):
            user.messages[f"m{m:04d}"] = (ham[u * per_user + m], ["Inbox"])
    return ham[: users * per_user]


def test_a_failed_message_is_archived_by_the_next_run_and_new_folders_merge(
    admin: Rest, tenant: FakeTenantServer, start_worker: Callable[[], Worker]
) -> None:
    start_worker()
    tenant_users(tenant, 1, 12)
    tenant.failing.add("m0004")
    source = create_source(admin, "tenant sync", "fake_tenant", {"endpoint": tenant.url})
    assert settled(admin, source["id"])["status"] == "active"
    assert len(archived(admin, source["id"])) == 11
    assert latest_run(admin, source["id"])["messagesFailed"] == 1

    tenant.failing.clear()
    user = next(iter(tenant.users.values()))
    raw, _ = user.messages["m0002"]
    user.messages["m0002"] = (raw, ["Inbox", "Later"])  # a label added on the server
    downloads = len(tenant.record.downloads)
    # This provider has no change feed: an import lists everything again, downloads
    # only what the archive lacks, and merges the labels of what it holds.
    assert admin.post(f"/v1/ingestion-sources/{source['id']}/import").status_code == 202
    assert settled(admin, source["id"])["status"] == "active"
    rows = {r["sha256"]: r for r in archived(admin, source["id"])}
    assert len(rows) == 12
    assert set(rows[sha(raw)]["folderPaths"]) == {"Inbox", "Later"}
    run = latest_run(admin, source["id"])
    assert (run["messagesArchived"], run["messagesFailed"]) == (1, 0)
    assert run["messagesAlreadyPresent"] == 11
    assert len(tenant.record.downloads) - downloads == 1


def test_a_tenant_whose_every_mailbox_is_skipped_is_in_error(
    admin: Rest, tenant: FakeTenantServer, start_worker: Callable[[], Worker]
) -> None:
    start_worker()
    tenant.add_user("x1", "x1@tenant.test", skip="no mail licence")
    tenant.add_user("x2", "x2@tenant.test", refuse="suspended")
    source = create_source(admin, "nobody readable", "fake_tenant", {"endpoint": tenant.url})
    done = settled(admin, source["id"])
    assert done["status"] == "error"
    assert "every one was skipped" in done["lastSyncStatusMessage"]


def test_two_workers_share_the_limits_and_the_cap_on_mailboxes(
    admin: Rest,
    tenant: FakeTenantServer,
    environment: dict[str, str],
    tmp_path: Path,
) -> None:
    rate = 40.0
    limited = {**environment, "LIMIT_FAKE_TENANT_TENANT": str(rate)}
    workers = [Worker(limited, tmp_path / f"w{i}.log", threads=2).start() for i in range(2)]
    try:
        tenant.latency = 0.01
        messages = tenant_users(tenant, 6, 20)
        config = {"endpoint": tenant.url, "maxConcurrentMailboxes": 3}
        source = create_source(admin, "limited tenant", "fake_tenant", config)
        assert settled(admin, source["id"], timeout=120)["status"] == "active"
        assert len(archived(admin, source["id"])) == len(messages)
    finally:
        for worker in workers:
            worker.stop()
    times = sorted(t for _, _, t in tenant.record.downloads)
    assert len(times) == len(messages)
    # No window of the run saw more than the bucket allows (burst 2, plus 0.1 s of
    # clock slack between Redis and this process).
    for i, start in enumerate(times):
        in_window = sum(1 for t in times[i:] if t - start <= 1.0)
        assert in_window <= 2 + rate * 1.1, f"{in_window} downloads within 1 s"
    assert max(tenant.record.peak_in_flight.values()) <= 2  # the per-user slot limit
    # The cap: at no moment were more than 3 mailboxes being downloaded from.
    spans = {}
    for user, _, t in tenant.record.downloads:
        first, last = spans.get(user, (t, t))
        spans[user] = (min(first, t), max(last, t))
    for moment in times:
        assert sum(1 for a, b in spans.values() if a <= moment <= b) <= 3


def test_the_runs_mailboxes_page_through_envoy_for_readers_only(
    admin: Rest,
    tenant: FakeTenantServer,
    start_worker: Callable[[], Worker],
    make_client: Callable[[str], Rest],
) -> None:
    start_worker()
    tenant_users(tenant, 3, 2)
    source = create_source(admin, "paged", "fake_tenant", {"endpoint": tenant.url})
    settled(admin, source["id"])
    run_id = latest_run(admin, source["id"])["id"]
    path = f"/v1/ingestion-sources/{source['id']}/sync-sessions/{run_id}/mailboxes"
    names, token = [], ""
    while True:
        page = admin.get(f"{path}?pageSize=2&pageToken={token}")
        assert page.status_code == 200, page.text
        names += [m["displayName"] for m in page.json()["mailboxes"]]
        token = page.json()["nextPageToken"]
        if not token:
            break
    assert names == ["user0@tenant.test", "user1@tenant.test", "user2@tenant.test"]
    first = admin.get(f"{path}?pageSize=1").json()["mailboxes"][0]
    assert set(first) == {
        "mailbox",
        "displayName",
        "state",
        "messagesFetched",
        "messagesArchived",
        "messagesAlreadyPresent",
        "messagesSkipped",
        "messagesFailed",
        "errorMessage",
        "updatedAt",
    }
    assert (first["state"], first["messagesFetched"], first["messagesArchived"]) == ("done", 2, 2)
    assert make_client("viewer").get(path).status_code == 200
    assert make_client("user").get(path).status_code == 404  # not theirs
    assert admin.get(path.replace(run_id, new_uuid())).status_code == 404
    bad = admin.get(f"{path}?pageToken=garbage")
    assert bad.status_code == 400
    assert bad.json()["details"][0]["fieldViolations"][0]["field"] == "pageToken"
    assert admin.get(f"{path}?pageSize=1001").status_code == 400
    assert Rest(admin.base_url).get(path).status_code == 401


def new_uuid() -> str:
    return str(uuid.uuid4())
