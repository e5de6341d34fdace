"""microsoft_365 driven directly (no engine) against a local HTTPS fake of the Microsoft
identity platform and of Graph, through the real msal and the provider's real HTTP
client: the connection check's answers, the tenant's users, every folder's messages
byte for byte, delta syncs, resumes, moves, expired tokens, faults and limits, and
the secret and tokens never showing up in a log or an error."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from ingestion_grpc.errors import (
    ConnectionCheckFailed,
    InvalidArgument,
    MailboxUnavailable,
    ProviderAuthError,
)
from ingestion_grpc.providers import graph_auth, graph_sync
from ingestion_grpc.providers.base import (
    Batch,
    ConcurrencyLimit,
    FetchContext,
    JsonDict,
    Limit,
    Limiter,
    Mailbox,
    ProviderEnvironment,
    RateLimit,
)
from ingestion_grpc.providers.graph_client import MAILBOX_CONCURRENCY, MAILBOX_REQUESTS
from ingestion_grpc.providers.microsoft_365 import Microsoft365
from tests.support.corpora import HAM, SPAM, mbox_messages
from tests.support.fake_graph import FakeGraph, FakeUser, encode_query
from tests.support.fetch_context import LocalLimiter, local_context

# The declared bucket (16 requests/s after a burst of 50) would make the larger tests
# wait for seconds; these limits keep the concurrency limit and drop the pacing.
UNPACED: tuple[Limit, ...] = (
    RateLimit(MAILBOX_REQUESTS.name, rate=100_000.0, burst=100_000.0),
    MAILBOX_CONCURRENCY,
)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGraph]:
    """A fresh fake tenant, its CA trusted the way an operator would: REQUESTS_CA_BUNDLE."""
    with FakeGraph() as server:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(server.ca_path))
        monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
        yield server


@dataclass(frozen=True)
class Wait:
    seconds: float
    thread: str


@pytest.fixture(autouse=True)
def waits(monkeypatch: pytest.MonkeyPatch) -> list[Wait]:
    """Every retry wait and throttling pause the provider asks for, served in 2 ms."""
    asked: list[Wait] = []

    def sleep(seconds: float) -> None:
        asked.append(Wait(seconds, threading.current_thread().name))
        time.sleep(min(seconds, 0.002))

    monkeypatch.setattr(graph_auth, "SLEEP", sleep)
    return asked


@pytest.fixture
def mail() -> Iterator[bytes]:
    """Distinct real messages, each used once per test."""
    return iter(mbox_messages(HAM) + mbox_messages(SPAM))


def take(mail: Iterator[bytes], count: int) -> list[bytes]:
    return [next(mail) for _ in range(count)]


def provider(
    fake: FakeGraph,
    graph_endpoint: str | None = None,
    limit_overrides: dict[str, float] | None = None,
    **config: Any,
) -> Microsoft365:
    settings = {
        "tenantId": fake.tenant_id,
        "clientId": fake.client_id,
        "clientSecret": fake.client_secret,
        **config,
    }
    environment = ProviderEnvironment(
        import_root=Path("/nonexistent"),
        upload_root=Path("/nonexistent"),
        microsoft_authority_host=fake.url,
        microsoft_graph_endpoint=graph_endpoint or fake.url,
        limit_overrides=limit_overrides or {},
    )
    return Microsoft365(Microsoft365.validate_config(settings), environment)


def mailbox_of(user: FakeUser) -> Mailbox:
    return Mailbox(user.id, user.upn)


class Sync:
    """Runs fetches of one mailbox the way the engine would: each one from the cursor
    of the last batch, recording what it archived."""

    def __init__(
        self,
        source: Microsoft365,
        user: FakeUser,
        limits: Sequence[Limit] = UNPACED,
        *,
        limiter: Limiter | None = None,
    ) -> None:
        self.source = source
        self.mailbox = mailbox_of(user)
        self.context, self.archive = local_context(limits)
        if limiter is not None:  # shared with other syncs, as the engine's are
            self.context = FetchContext(archive=self.archive, limits=limiter)
        self.cursor: JsonDict | None = None

    def run(self) -> list[Batch]:
        batches = list(self.source.fetch(self.mailbox, self.cursor, self.context))
        self.archive.record(batches)
        if batches:
            self.cursor = batches[-1].cursor
        return batches


def fetched(batches: Sequence[Batch]) -> dict[str, tuple[bytes, tuple[str, ...]]]:
    """Every fetched message by id, each exactly once."""
    messages = [m for batch in batches for m in batch.messages]
    ids = [m.provider_message_id for m in messages]
    assert len(ids) == len(set(ids)), "a message was handed over twice"
    return {m.provider_message_id: (m.raw, m.folder_paths) for m in messages}


def known(batches: Sequence[Batch]) -> list[tuple[str, tuple[str, ...]]]:
    return [(k.provider_message_id, k.folder_paths) for batch in batches for k in batch.known]


def fill(fake: FakeGraph, user: FakeUser, layout: dict[str, list[bytes]]) -> dict[str, Any]:
    """Messages added per folder path; {id: (raw, (path,))}."""
    expected: dict[str, Any] = {}
    for path, raws in layout.items():
        ids = fake.add_messages(user, user.folder(path), raws)
        expected.update({i: (raw, (path,)) for i, raw in zip(ids, raws, strict=True)})
    return expected


# --- configuration and the connection check ------------------------------------------


def test_declared_limits_stay_within_graphs_published_ones() -> None:
    bucket, slots = Microsoft365.limits
    assert isinstance(bucket, RateLimit) and isinstance(slots, ConcurrencyLimit)
    # A token bucket lets its burst through on top of rate x window.
    assert bucket.burst + bucket.rate * 600 <= 10_000
    assert bucket.rate * 600 >= 0.9 * 10_000  # and does not leave the budget unused
    assert slots.limit == 4


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tenantId", "contoso.onmicrosoft.com/../common"),
        ("clientId", "client id with spaces"),
        ("includeUsers", ["alice@contoso.example", " "]),
        ("excludeFolders", [3]),
        ("maxConcurrentMailboxes", 0),
    ],
)
def test_config_rejects_values_that_cannot_work(field: str, value: Any) -> None:
    config = {"tenantId": "contoso.example", "clientId": "c-1", "clientSecret": "s", field: value}
    with pytest.raises(InvalidArgument) as caught:
        Microsoft365.validate_config(config)
    assert caught.value.field == f"providerConfig.{field}"


def test_connection_check_gets_a_token_and_reads_one_user(fake: FakeGraph) -> None:
    fake.add_user("alice@contoso.example")
    # A trailing slash must not give the scope "https://host//.default" (the fake
    # refuses any scope but "{url}/.default", as Entra ID does).
    provider(fake, graph_endpoint=fake.url + "/").check_connection()
    assert fake.token_requests == 1
    users = [r for r in fake.requests if r.path == "/v1.0/users"]
    assert [(r.query, r.status) for r in users] == [({"$top": "1", "$select": "id"}, 200)]


def test_the_tenant_may_be_named_by_a_domain(fake: FakeGraph) -> None:
    provider(fake, tenantId=fake.tenant_domain).check_connection()


def test_unknown_tenant_says_so(fake: FakeGraph) -> None:
    with pytest.raises(ConnectionCheckFailed) as caught:
        provider(fake, tenantId="nosuch.example").check_connection()
    assert isinstance(caught.value, ProviderAuthError)
    assert "tenant 'nosuch.example' is unknown" in str(caught.value)
    assert fake.client_secret not in str(caught.value)


@pytest.mark.parametrize("expired", [False, True], ids=["wrong", "expired"])
def test_bad_secret_says_it_is_invalid_or_expired(fake: FakeGraph, expired: bool) -> None:
    if expired:
        fake.expire_secret()
        secret = fake.client_secret
    else:
        secret = fake.client_secret[:-4] + "XXXX"
    with pytest.raises(ProviderAuthError) as caught:
        provider(fake, clientSecret=secret).check_connection()
    text = f"{caught.value} {caught.value!r}"
    assert "the client secret is invalid or has expired" in text
    assert ("AADSTS7000222" if expired else "AADSTS7000215") in text
    assert secret not in text and fake.client_secret not in text


def test_unknown_client_names_it(fake: FakeGraph) -> None:
    with pytest.raises(ProviderAuthError) as caught:
        provider(fake, clientId="0a1b2c3d-0000-4000-8000-000000000000").check_connection()
    assert "'0a1b2c3d-0000-4000-8000-000000000000' is unknown" in str(caught.value)
    assert "AADSTS700016" in str(caught.value)


def test_missing_permissions_name_them_and_admin_consent(fake: FakeGraph) -> None:
    app = fake.add_app(permissions={"Mail.Read"})
    source = provider(fake, clientId=app.client_id, clientSecret=app.secret)
    for call in (source.check_connection, source.list_mailboxes):
        with pytest.raises(ProviderAuthError) as caught:
            call()
        text = str(caught.value)
        assert "User.Read.All" in text and "Mail.Read" in text and "admin consent" in text
        assert app.secret not in text


def test_ssl_cert_file_is_trusted_when_requests_has_no_bundle(
    fake: FakeGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    monkeypatch.setenv("SSL_CERT_FILE", str(fake.ca_path))
    provider(fake).check_connection()


def test_an_untrusted_certificate_fails_the_check_clearly(
    fake: FakeGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with pytest.raises(ConnectionCheckFailed) as caught:
        provider(fake).check_connection()
    assert not isinstance(caught.value, ProviderAuthError)
    assert "certificate verify failed" in str(caught.value)
    assert fake.token_requests == 0


# --- the tenant's users -------------------------------------------------------------------


def test_list_mailboxes_reads_every_page_and_filters_on_the_upn(fake: FakeGraph) -> None:
    fake.max_users_page = 2
    upns = [
        "alice@contoso.example",
        "Bob@Contoso.Example",
        "archive-dave@contoso.example",
        "erin@other.example",
        "carol@contoso.example",
        "gina@contoso.example",
    ]
    users = {upn: fake.add_user(upn, mailbox=upn != "gina@contoso.example") for upn in upns}
    guest = fake.add_user("frank_partner.example#EXT#@contoso.example", guest=True)

    mailboxes = provider(
        fake, includeUsers=["*@CONTOSO.example"], excludeUsers=["ARCHIVE-*"]
    ).list_mailboxes()

    wanted = ["alice@contoso.example", "Bob@Contoso.Example", "carol@contoso.example"]
    assert [(m.id, m.display_name, m.skip_reason) for m in mailboxes] == [
        *[(users[upn].id, upn, "") for upn in wanted],
        # Without a licence: only a fetch can tell (MailboxUnavailable, tested below).
        (users["gina@contoso.example"].id, "gina@contoso.example", ""),
        (guest.id, guest.upn, "a guest account: its mailbox belongs to another organisation"),
    ]
    pages = [r for r in fake.requests if r.path == "/v1.0/users"]
    assert len(pages) == 4  # 7 users, 2 a page
    assert pages[0].query["$select"] == "id,userPrincipalName,mail,userType"


def test_a_user_without_a_mailbox_is_skipped_with_the_reason(fake: FakeGraph) -> None:
    unlicensed = fake.add_user("gina@contoso.example", mailbox=False)
    guest = fake.add_user("frank_partner.example#EXT#@contoso.example", guest=True)
    for user in (unlicensed, guest):
        with pytest.raises(MailboxUnavailable) as caught:
            Sync(provider(fake), user).run()
        assert "no Exchange Online mailbox" in str(caught.value)
        assert "MailboxNotEnabledForRESTAPI" in str(caught.value)


def test_a_mailbox_graph_denies_is_skipped_naming_mail_read(fake: FakeGraph) -> None:
    app = fake.add_app(permissions={"User.Read.All"})
    alice = fake.add_user("alice@contoso.example")
    with pytest.raises(MailboxUnavailable) as caught:
        Sync(provider(fake, clientId=app.client_id, clientSecret=app.secret), alice).run()
    assert "Mail.Read" in str(caught.value)


# --- reading a mailbox ----------------------------------------------------------------------


def build_mailbox(fake: FakeGraph, mail: Iterator[bytes]) -> tuple[FakeUser, dict[str, Any]]:
    """Nested, hidden, localised folders, spread over small pages."""
    alice = fake.add_user("alice@contoso.example")
    fake.add_folder(alice, "Projekte", "Inbox")
    fake.add_folder(alice, "Größe 2002", "Inbox/Projekte")
    fake.add_folder(alice, "Sync Issues", hidden=True)
    # Archive has no visible child: its childFolderCount says 0, yet this one exists.
    fake.add_folder(alice, "Verborgen", "Archive", hidden=True)
    fake.add_folder(alice, "Boîte de réception")
    fake.add_folder(alice, "アーカイブ", "Boîte de réception")
    layout = {
        "Inbox": take(mail, 12),
        "Inbox/Projekte": take(mail, 3),
        "Inbox/Projekte/Größe 2002": take(mail, 5),
        "Sync Issues": take(mail, 2),
        "Archive/Verborgen": take(mail, 2),
        "Boîte de réception": take(mail, 2),
        "Boîte de réception/アーカイブ": take(mail, 2),
        "Junk Email": take(mail, 4),
        "Deleted Items": take(mail, 3),
    }
    return alice, fill(fake, alice, layout)


def test_fetch_archives_every_folder_byte_for_byte(
    fake: FakeGraph, mail: Iterator[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(graph_sync, "DELTA_PAGE", 3)
    fake.max_folders_page = 2
    alice, expected = build_mailbox(fake, mail)

    sync = Sync(provider(fake), alice)
    batches = sync.run()

    assert fetched(batches) == expected
    assert fake.value_requests(alice) == Counter(dict.fromkeys(expected, 1))
    assert all(len(b.messages) <= 3 for b in batches)  # one delta page at most
    assert not any(b.skipped or b.failed or b.known for b in batches)
    assert sync.cursor is not None
    entries = sync.cursor["folders"]
    assert len(entries) == len(alice.folders) == 13
    assert all(set(e) == {"path", "deltaLink"} for e in entries.values())
    # Every page asked for hidden folders, and every folder's children were asked for.
    listings = [r for r in fake.requests if "mailFolders" in r.path and "delta" not in r.path]
    assert all(r.query["includeHiddenFolders"] == "true" for r in listings)
    assert len({r.path for r in listings}) == 1 + 13


def test_a_large_message_arrives_byte_for_byte(fake: FakeGraph, mail: Iterator[bytes]) -> None:
    alice = fake.add_user("alice@contoso.example", standard_folders=False)
    fake.add_folder(alice, "Inbox")
    head = next(mail)
    attachment = b"".join(b"%076d\r\n" % n for n in range(24 * 1024 * 1024 // 78))
    large = head.rstrip(b"\n") + b"\n\n" + attachment
    expected = fill(fake, alice, {"Inbox": [large, next(mail)]})
    assert fetched(Sync(provider(fake), alice).run()) == expected


def test_include_and_exclude_folders(fake: FakeGraph, mail: Iterator[bytes]) -> None:
    alice, expected = build_mailbox(fake, mail)
    source = provider(
        fake,
        includeFolders=["Inbox", "Inbox/*", "Junk Email", "inbox*"],
        excludeFolders=["Inbox/Projekte/*"],
    )
    batches = Sync(source, alice).run()
    wanted = {"Inbox", "Inbox/Projekte", "Junk Email"}
    assert fetched(batches) == {i: v for i, v in expected.items() if v[1][0] in wanted}
    delta_paths = {r.path for r in fake.requests if r.path.endswith("/messages/delta")}
    assert len(delta_paths) == 3  # excluded folders are not even listed


def test_sync_archives_exactly_the_new_mail_and_new_folders(
    fake: FakeGraph, mail: Iterator[bytes]
) -> None:
    alice = fake.add_user("alice@contoso.example")
    old = fill(fake, alice, {"Inbox": take(mail, 6), "Archive": take(mail, 2)})
    sync = Sync(provider(fake), alice)
    assert fetched(sync.run()) == old

    new = fill(fake, alice, {"Inbox": take(mail, 3)})
    fake.add_folder(alice, "2024", "Archive")
    new |= fill(fake, alice, {"Archive/2024": take(mail, 2)})
    gone, changed, *_ = [i for i, v in old.items() if v[1] == ("Inbox",)]
    fake.delete_message(alice, gone)  # comes as @removed: ignored
    fake.change_message(alice, changed)  # comes again: already archived
    fake.reset_counters()
    assert sync.cursor is not None
    delta_links = {e["deltaLink"] for e in sync.cursor["folders"].values()}

    batches = sync.run()
    # Each folder's round started from its deltaLink, verbatim.
    asked = [r for r in fake.requests if "$deltatoken" in r.query]
    assert len(asked) == len(delta_links) == 7
    served = {unquote(link) for link in delta_links}  # the log holds decoded paths
    assert {f"{fake.url}{r.path}?{encode_query(r.query)}" for r in asked} == served
    assert fetched(batches) == new
    assert known(batches) == [(changed, ("Inbox",))]
    assert not any(b.skipped or b.failed for b in batches)
    assert fake.value_requests(alice) == Counter(dict.fromkeys(new, 1))

    fake.reset_counters()
    assert fetched(sync.run()) == {}
    assert fake.value_requests(alice) == Counter()


def test_a_resume_from_any_cursor_yields_exactly_the_rest(
    fake: FakeGraph, mail: Iterator[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As after a worker killed mid-folder: the cursor of each batch, archive or not."""
    monkeypatch.setattr(graph_sync, "DELTA_PAGE", 5)
    raws = take(mail, 23)
    # Batches end inside delta pages too (the byte cap), so some cursors hold `seen`.
    monkeypatch.setattr(graph_sync, "BATCH_BYTES", 2 * max(len(r) for r in raws[:12]))
    alice = fake.add_user("alice@contoso.example", standard_folders=False)
    fake.add_folder(alice, "Inbox")
    fake.add_folder(alice, "Archive")
    expected = fill(fake, alice, {"Inbox": raws[:15], "Archive": raws[15:]})

    first = Sync(provider(fake), alice)
    batches = first.run()
    order = [m.provider_message_id for b in batches for m in b.messages]
    assert sorted(order) == sorted(expected)
    cursors = [b.cursor for b in batches]
    assert any("seen" in e for c in cursors for e in c["folders"].values())
    assert any("nextLink" in e for c in cursors for e in c["folders"].values())

    handed = 0
    for index, batch in enumerate(batches[:-1]):
        handed += len(batch.messages)
        fake.reset_counters()
        resumed = Sync(provider(fake), alice)
        resumed.cursor = batch.cursor  # a fresh archive: only the cursor tells
        rest = [m.provider_message_id for b in resumed.run() for m in b.messages]
        assert rest == order[handed:], f"resuming after batch {index}"
        assert set(fake.value_requests(alice)) == set(order[handed:])


@pytest.mark.parametrize(
    ("status", "code"),
    [(410, "SyncStateNotFound"), (400, "resyncRequired"), (400, "syncStateInvalid")],
)
def test_an_expired_delta_token_lists_the_folder_again_and_downloads_only_new_mail(
    fake: FakeGraph, mail: Iterator[bytes], status: int, code: str
) -> None:
    alice = fake.add_user("alice@contoso.example")
    old = fill(fake, alice, {"Inbox": take(mail, 7), "Archive": take(mail, 3)})
    sync = Sync(provider(fake), alice)
    sync.run()
    new = fill(fake, alice, {"Inbox": take(mail, 2)})
    fake.expire_delta(alice.folder("Inbox"), status=status, code=code)
    fake.reset_counters()

    batches = sync.run()
    assert fetched(batches) == new
    assert sorted(known(batches)) == sorted((i, v[1]) for i, v in old.items() if v[1] == ("Inbox",))
    assert fake.value_requests(alice) == Counter(dict.fromkeys(new, 1))
    assert [r.status for r in fake.requests_to(alice, "/messages/delta") if r.status >= 400] == [
        status
    ]


def test_an_expired_next_link_restarts_the_folder_without_downloading_twice(
    fake: FakeGraph, mail: Iterator[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(graph_sync, "DELTA_PAGE", 4)
    alice = fake.add_user("alice@contoso.example", standard_folders=False)
    inbox = fake.add_folder(alice, "Inbox")
    expected = fill(fake, alice, {"Inbox": take(mail, 10)})
    sync = Sync(provider(fake), alice)
    killed = sync.source.fetch(sync.mailbox, None, sync.context)
    assert isinstance(killed, Generator)
    first = next(killed)  # archived; then the worker dies
    killed.close()
    sync.archive.record([first])
    sync.cursor = first.cursor
    assert "nextLink" in first.cursor["folders"][inbox.id]
    fake.expire_delta(inbox)
    fake.reset_counters()

    batches = sync.run()
    assert fetched([first, *batches]) == expected
    archived = [m.provider_message_id for m in first.messages]
    assert sorted(known(batches)) == sorted((i, ("Inbox",)) for i in archived)
    assert fake.value_requests(alice) == Counter(dict.fromkeys(set(expected) - set(archived), 1))


def test_a_moved_message_keeps_its_id_gains_the_path_and_is_not_downloaded_again(
    fake: FakeGraph, mail: Iterator[bytes]
) -> None:
    alice = fake.add_user("alice@contoso.example")
    old = fill(fake, alice, {"Inbox": take(mail, 4)})
    sync = Sync(provider(fake), alice)
    sync.run()
    moved = next(iter(old))
    fake.move_message(alice, moved, alice.folder("Archive"))

    batches = sync.run()
    assert fetched(batches) == {}
    assert known(batches) == [(moved, ("Archive",))]
    # Without Prefer: IdType="ImmutableId" the fake gives the moved message a new id.
    assert fake.value_requests(alice)[moved] == 1
    assert all(r.immutable_ids for r in fake.requests_to(alice, "/messages/delta"))


def test_a_message_gone_is_skipped_and_one_that_keeps_failing_is_fetched_next_run(
    fake: FakeGraph, mail: Iterator[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(graph_sync, "DELTA_PAGE", 3)
    alice = fake.add_user("alice@contoso.example")
    expected = fill(fake, alice, {"Inbox": take(mail, 9)})
    ids = list(expected)
    gone, failing = ids[1], ids[4]
    fake.fail_value(gone, status=404, code="ErrorItemNotFound")
    fake.fail_value(failing, status=500)
    sync = Sync(provider(fake), alice)

    batches = sync.run()
    assert fetched(batches) == {i: expected[i] for i in ids if i not in (gone, failing)}
    assert [u.provider_message_id for b in batches for u in b.skipped] == [gone]
    assert [u.provider_message_id for b in batches for u in b.failed] == [failing]
    assert sync.cursor is not None
    inbox = sync.cursor["folders"][alice.folder("Inbox").id]
    assert inbox["failed"] == [failing]
    assert fake.value_requests(alice)[failing] == graph_sync.VALUE_ATTEMPTS

    fake.fail_value(failing, times=0)  # Graph serves it again
    fake.reset_counters()
    batches = sync.run()
    assert fetched(batches) == {failing: expected[failing]}
    assert not any(b.failed or b.skipped for b in batches)
    assert "failed" not in sync.cursor["folders"][alice.folder("Inbox").id]
    assert set(fake.value_requests(alice)) == {failing}


def test_a_failing_message_moved_elsewhere_is_not_reported_as_archived(
    fake: FakeGraph, mail: Iterator[bytes]
) -> None:
    alice = fake.add_user("alice@contoso.example")
    expected = fill(fake, alice, {"Inbox": take(mail, 3)})
    failing = list(expected)[1]
    fake.fail_value(failing, status=503)
    sync = Sync(provider(fake), alice)
    sync.run()
    fake.move_message(alice, failing, alice.folder("Archive"))

    # Retried (and failing again) from Inbox's `failed`, then listed in Archive: it is
    # in no archive, so it must not come as a KnownMessage (the engine refuses those).
    batches = sync.run()
    assert known(batches) == []
    assert [u.provider_message_id for b in batches for u in b.failed] == [failing]
    assert sync.cursor is not None
    assert sync.cursor["folders"][alice.folder("Inbox").id]["failed"] == [failing]

    fake.fail_value(failing, times=0)
    assert fetched(sync.run()) == {failing: expected[failing]}


@pytest.mark.parametrize(
    ("status", "code", "retry_after"),
    [(429, "ApplicationThrottled", 3), (503, "ServiceUnavailable", 2), (504, "GatewayTimeout", 2)],
)
def test_throttling_honours_retry_after_for_that_mailbox_only(
    fake: FakeGraph,
    mail: Iterator[bytes],
    waits: list[Wait],
    status: int,
    code: str,
    retry_after: int,
) -> None:
    slow = fake.add_user("slow@contoso.example")
    fast = fake.add_user("fast@contoso.example")
    expected = {
        slow.upn: fill(fake, slow, {"Inbox": take(mail, 10)}),
        fast.upn: fill(fake, fast, {"Inbox": take(mail, 10)}),
    }
    fake.throttle(slow, 4, status=status, code=code, retry_after=retry_after)
    source = provider(fake)
    results: dict[str, Any] = {}

    def run(user: FakeUser) -> None:
        results[user.upn] = fetched(Sync(source, user).run())

    threads = [threading.Thread(target=run, args=(u,), name=f"run-{u.upn}") for u in (slow, fast)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == expected
    honoured = [w for w in waits if w.seconds >= retry_after]
    assert honoured, "no wait of Retry-After seconds"
    assert all(slow.upn in w.thread for w in waits), "the other mailbox waited too"


def test_after_a_429_the_mailboxs_other_requests_hold_off_too(
    fake: FakeGraph, mail: Iterator[bytes], waits: list[Wait]
) -> None:
    alice = fake.add_user("alice@contoso.example", standard_folders=False)
    fake.add_folder(alice, "Inbox")
    expected = fill(fake, alice, {"Inbox": take(mail, 12)})
    fake.throttle(alice, 1, retry_after=3)  # the first request: the folder listing
    assert fetched(Sync(provider(fake), alice).run()) == expected
    # The throttled call waited, and so did each later one (all within those 3 s).
    assert len([w for w in waits if w.seconds >= 2]) >= 1 + 12
    assert fake.stats(alice).throttled == 1


def test_past_the_request_budget_graph_is_waited_for(
    fake: FakeGraph, mail: Iterator[bytes], monkeypatch: pytest.MonkeyPatch, waits: list[Wait]
) -> None:
    def sleep(seconds: float) -> None:  # for real: the fake's window is real time
        waits.append(Wait(seconds, ""))
        time.sleep(seconds)

    monkeypatch.setattr(graph_auth, "SLEEP", sleep)
    fake.budget, fake.budget_window = 10, 1.0
    alice = fake.add_user("alice@contoso.example", standard_folders=False)
    fake.add_folder(alice, "Inbox")
    expected = fill(fake, alice, {"Inbox": take(mail, 14)})
    assert fetched(Sync(provider(fake), alice).run()) == expected
    assert fake.stats(alice).throttled >= 1
    assert any(w.seconds >= 1 for w in waits)


def test_never_more_than_four_requests_in_flight_per_mailbox(
    fake: FakeGraph, mail: Iterator[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small delta pages: the next page is asked for while 4 downloads are in flight.
    monkeypatch.setattr(graph_sync, "DELTA_PAGE", 5)
    fake.latency = 0.02
    alice = fake.add_user("alice@contoso.example", standard_folders=False)
    fake.add_folder(alice, "Inbox")
    expected = fill(fake, alice, {"Inbox": take(mail, 40)})
    assert fetched(Sync(provider(fake), alice).run()) == expected
    stats = fake.stats(alice)
    assert stats.peak_concurrency == 4  # as many as allowed, never more
    assert stats.throttled == 0


def test_two_sources_reading_one_mailbox_at_once_share_its_four_places(
    fake: FakeGraph, mail: Iterator[bytes]
) -> None:
    """Two sources of one tenant (or two workers) on one mailbox: the limit is the
    mailbox's, so together they keep at most 4 requests in flight."""
    fake.latency = 0.02
    alice = fake.add_user("alice@contoso.example", standard_folders=False)
    fake.add_folder(alice, "Inbox")
    fake.add_folder(alice, "Archive")
    expected = fill(fake, alice, {"Inbox": take(mail, 25), "Archive": take(mail, 25)})
    shared = LocalLimiter(UNPACED)
    results: dict[str, Any] = {}

    def run(folder: str) -> None:
        source = provider(fake, includeFolders=[folder])
        results[folder] = fetched(Sync(source, alice, limiter=shared).run())

    threads = [threading.Thread(target=run, args=(f,)) for f in ("Inbox", "Archive")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results["Inbox"] | results["Archive"] == expected
    stats = fake.stats(alice)
    assert stats.peak_concurrency == 4
    assert stats.throttled == 0


def test_the_fake_catches_a_client_over_the_concurrency_limit(
    fake: FakeGraph, mail: Iterator[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above can fail: allowed 8 at once, the provider trips the fake's limit,
    is answered 429 MailboxConcurrency, retries and still archives everything once."""
    # Retry waits here are 2 ms, so retries collide again and again: allow many.
    monkeypatch.setattr(graph_sync, "VALUE_ATTEMPTS", 50)
    fake.latency = 0.02
    fake.concurrency_retry_after = 0
    alice = fake.add_user("alice@contoso.example", standard_folders=False)
    fake.add_folder(alice, "Inbox")
    expected = fill(fake, alice, {"Inbox": take(mail, 40)})
    source = provider(fake, limit_overrides={MAILBOX_CONCURRENCY.name: 8})
    eight = (UNPACED[0], ConcurrencyLimit(MAILBOX_CONCURRENCY.name, 8))
    assert fetched(Sync(source, alice, eight).run()) == expected
    stats = fake.stats(alice)
    assert stats.peak_concurrency > 4
    assert stats.throttled > 0


# --- credentials over time -----------------------------------------------------------------


def test_a_refused_token_is_replaced_once(fake: FakeGraph, mail: Iterator[bytes]) -> None:
    alice = fake.add_user("alice@contoso.example")
    fill(fake, alice, {"Inbox": take(mail, 2)})
    sync = Sync(provider(fake), alice)
    sync.run()
    new = fill(fake, alice, {"Inbox": take(mail, 3)})
    fake.expire_tokens()

    assert fetched(sync.run()) == new
    assert fake.token_requests == 2
    refused = [r for r in fake.requests if r.status == 401]
    assert 1 <= len(refused) <= 4  # the requests in flight when the token expired


def test_a_rotated_secret_is_an_auth_error_until_the_source_has_the_new_one(
    fake: FakeGraph, mail: Iterator[bytes]
) -> None:
    alice = fake.add_user("alice@contoso.example")
    old_secret = fake.client_secret
    sync = Sync(provider(fake), alice)
    sync.run()
    new_secret = fake.rotate_secret()
    fake.expire_tokens()
    expected = fill(fake, alice, {"Inbox": take(mail, 2)})

    with pytest.raises(ProviderAuthError) as caught:
        sync.run()
    text = f"{caught.value} {caught.value!r}"
    assert "the client secret is invalid or has expired" in text
    assert old_secret not in text and new_secret not in text

    sync.source = provider(fake, clientSecret=new_secret)  # the source updated
    assert fetched(sync.run()) == expected


def test_the_secret_and_tokens_never_appear_in_logs_or_errors(
    fake: FakeGraph, mail: Iterator[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("msal", "urllib3", "requests", "ingestion_grpc"):
        caplog.set_level(logging.DEBUG, logger=name)
    alice = fake.add_user("alice@contoso.example")
    fill(fake, alice, {"Inbox": take(mail, 3)})
    source = provider(fake)
    errors: list[str] = []

    source.check_connection()
    source.list_mailboxes()
    sync = Sync(source, alice)
    sync.run()
    fake.expire_tokens()  # a 401, a new token
    fill(fake, alice, {"Inbox": take(mail, 1)})
    sync.run()
    secrets = [fake.client_secret]
    for bad in (fake.client_secret + "x", "wrong-" + fake.client_secret):
        secrets.append(bad)
        with pytest.raises(ProviderAuthError) as caught:
            provider(fake, clientSecret=bad).check_connection()
        errors.append(f"{caught.value} {caught.value!r} {caught.value.__cause__!r}")
    fake.rotate_secret()
    fake.expire_tokens()
    with pytest.raises(ProviderAuthError) as caught:
        sync.run()
    errors.append(f"{caught.value} {caught.value!r} {caught.value.__context__!r}")

    logged = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert {"msal", "urllib3"} <= {r.name.split(".")[0] for r in caplog.records}
    assert len(fake.issued_tokens) == 2
    for value in secrets + fake.issued_tokens:
        assert value not in logged
        assert all(value not in error for error in errors)
