"""google_workspace driven directly against a local fake of Google (token endpoint,
Directory, Gmail) through the real google-api-python-client and google-auth: the
connection check, the users, every message exactly once and byte for byte with its
labels as folder paths, resuming from every cursor, history sync, and the faults."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt
import pytest

from ingestion_grpc.errors import (
    ConnectionCheckFailed,
    MailboxUnavailable,
    ProviderAuthError,
    ProviderUnavailable,
)
from ingestion_grpc.providers import google_fetch
from ingestion_grpc.providers.base import (
    Batch,
    FetchContext,
    KnownMessage,
    Limit,
    Mailbox,
    ProviderEnvironment,
    RateLimit,
)
from ingestion_grpc.providers.google_workspace import GoogleWorkspace
from tests.support.corpora import HAM, SPAM, mbox_messages
from tests.support.fake_google import (
    DIRECTORY_SCOPE,
    GMAIL_SCOPE,
    FakeGoogle,
    ServiceAccountKey,
)
from tests.support.fetch_context import RememberingArchive, local_context

ADMIN = "admin@example.com"
ALICE = "alice@example.com"
# The declared limits with the rate limits opened up: most tests are not about pace.
FAST_LIMITS: list[Limit] = [
    replace(limit, rate=1e9, burst=1e9) if isinstance(limit, RateLimit) else limit
    for limit in GoogleWorkspace.limits
]


@pytest.fixture(scope="module")
def corpus() -> list[bytes]:
    return list(mbox_messages(HAM)) + list(mbox_messages(SPAM))


class Domain:
    """A fake Google Workspace domain: a key, an admin, users with corpus mail."""

    def __init__(self, google: FakeGoogle, corpus: list[bytes]) -> None:
        self.google = google
        self.key: ServiceAccountKey = google.new_key()
        google.add_user(ADMIN, admin=True)
        self.sleeps: list[float] = []
        self._unused = iter(corpus)
        self.raw: dict[str, bytes] = {}

    def add(self, email: str, count: int, labels: Sequence[str] = ("INBOX",)) -> list[str]:
        ids = []
        for _ in range(count):
            raw = next(self._unused)
            message_id = self.google.add_message(email, raw, labels)
            self.raw[message_id] = raw
            ids.append(message_id)
        return ids

    def config(self, **changes: Any) -> dict[str, Any]:
        config = {"serviceAccountKeyJson": self.key.json, "impersonatedAdminEmail": ADMIN}
        return GoogleWorkspace.validate_config({**config, **changes})

    def provider(self, **changes: Any) -> GoogleWorkspace:
        provider = GoogleWorkspace(
            self.config(**changes),
            ProviderEnvironment(Path("/nonexistent"), Path("/nonexistent"), self.google.url),
        )
        # Backoff waits are recorded, not slept: the tests check them, fast.
        provider.retry_sleep = self.sleeps.append
        provider.retry_attempts = 4
        return provider

    def mailbox(self, email: str) -> Mailbox:
        return Mailbox(self.google.user(email).id, email)

    def secrets(self) -> list[str]:
        """Everything that must never show up in an error or a log line."""
        body = "".join(self.key.private_key_pem.splitlines()[1:-1])
        return [
            self.key.json,
            self.key.private_key_pem,
            body[:64],
            body[-64:],
            *self.google.issued_tokens,
            *(a for a in self.google.assertions if a),
        ]


@pytest.fixture
def google() -> Iterator[FakeGoogle]:
    with FakeGoogle() as fake:
        yield fake


@pytest.fixture
def domain(google: FakeGoogle, corpus: list[bytes]) -> Domain:
    return Domain(google, corpus)


def fetch_all(
    provider: GoogleWorkspace,
    mailbox: Mailbox,
    cursor: dict[str, Any] | None = None,
    context: tuple[FetchContext, RememberingArchive] | None = None,
) -> list[Batch]:
    """Every batch of one fetch, recorded in the archive as the engine would."""
    ctx, archive = context or local_context(FAST_LIMITS)
    batches = []
    for batch in provider.fetch(mailbox, cursor, ctx):
        archive.record([batch])
        batches.append(batch)
    return batches


def fetched(batches: Sequence[Batch]) -> dict[str, tuple[bytes, set[str]]]:
    """id -> (raw, folder paths); fails if any message is handed over twice."""
    out: dict[str, tuple[bytes, set[str]]] = {}
    for batch in batches:
        for message in batch.messages:
            assert message.provider_message_id not in out, "handed over twice"
            assert len(message.folder_paths) == len(set(message.folder_paths))
            out[message.provider_message_id] = (message.raw, set(message.folder_paths))
    return out


def assert_no_secret(domain: Domain, *texts: object) -> None:
    for text in texts:
        for secret in domain.secrets():
            assert secret not in str(text)


def error_texts(error: BaseException) -> list[str]:
    """The error and everything chained to it, as a log line with a traceback shows."""
    texts = []
    current: BaseException | None = error
    while current is not None:
        texts += [str(current), repr(current)]
        current = current.__cause__ or current.__context__
    return texts


# --- the connection check --------------------------------------------------------------


def test_check_asks_one_token_for_both_scopes_as_the_admin(domain: Domain) -> None:
    domain.provider().check_connection()
    tokens = [e for e in domain.google.log if e.api == "token"]
    assert [e.status for e in tokens] == [200]
    claims = jwt.decode(domain.google.assertions[0], options={"verify_signature": False})
    assert claims["sub"] == ADMIN
    assert set(claims["scope"].split()) == {DIRECTORY_SCOPE, GMAIL_SCOPE}
    (listing,) = [e for e in domain.google.log if e.api == "users.list"]
    assert listing.status == 200
    assert listing.query["customer"] == ["my_customer"]
    assert listing.query["maxResults"] == ["1"]


def refuse_delegation(domain: Domain) -> dict[str, Any]:
    domain.google.grant(domain.key, [])
    return {}


def grant_only_directory(domain: Domain) -> dict[str, Any]:
    domain.google.grant(domain.key, [DIRECTORY_SCOPE])
    return {}


def grant_only_gmail(domain: Domain) -> dict[str, Any]:
    domain.google.grant(domain.key, [GMAIL_SCOPE])
    return {}


def unknown_admin(domain: Domain) -> dict[str, Any]:
    return {"impersonatedAdminEmail": "nobody@example.com"}


def not_an_admin(domain: Domain) -> dict[str, Any]:
    domain.google.add_user("clerk@example.com")
    return {"impersonatedAdminEmail": "clerk@example.com"}


def foreign_signature(domain: Domain) -> dict[str, Any]:
    return {"serviceAccountKeyJson": domain.key.with_other_private_key()}


def malformed_private_key(domain: Domain) -> dict[str, Any]:
    info = json.loads(domain.key.json)
    # A real key's first lines with the rest cut off: structurally a key file still.
    info["private_key"] = "\n".join(domain.key.private_key_pem.splitlines()[:4]) + "\n"
    return {"serviceAccountKeyJson": json.dumps(info)}


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (refuse_delegation, ["unauthorized_client", DIRECTORY_SCOPE, GMAIL_SCOPE, "client ID"]),
        (grant_only_directory, ["unauthorized_client", DIRECTORY_SCOPE, GMAIL_SCOPE]),
        (grant_only_gmail, ["unauthorized_client", DIRECTORY_SCOPE, GMAIL_SCOPE]),
        (unknown_admin, ["invalid_grant", "impersonatedAdminEmail", "nobody@example.com"]),
        (not_an_admin, ["403", "impersonatedAdminEmail", "super administrator"]),
        (foreign_signature, ["Invalid JWT Signature", "serviceAccountKeyJson"]),
        (malformed_private_key, ["serviceAccountKeyJson", "private_key"]),
    ],
    ids=lambda v: v.__name__ if callable(v) else "",
)
def test_a_refused_check_says_what_failed_without_quoting_the_key(
    domain: Domain, setup: Callable[[Domain], dict[str, Any]], expected: list[str]
) -> None:
    provider = domain.provider(**setup(domain))
    with pytest.raises(ProviderAuthError) as caught:
        provider.check_connection()
    message = str(caught.value)
    for fragment in expected:
        assert fragment in message
    if setup is refuse_delegation:
        assert domain.key.client_id in message
    assert_no_secret(domain, *error_texts(caught.value))
    assert isinstance(caught.value, ConnectionCheckFailed)  # a 400 at create


def test_the_check_rides_out_a_transient_directory_failure(domain: Domain) -> None:
    domain.google.fail_next(2, 503, api="users.list")
    domain.provider().check_connection()
    assert [e.status for e in domain.google.log if e.api == "users.list"] == [503, 503, 200]


def test_the_check_gives_up_on_a_directory_that_keeps_failing(domain: Domain) -> None:
    domain.google.fail_next(10, 500, api="users.list")
    with pytest.raises(ConnectionCheckFailed) as caught:
        domain.provider().check_connection()
    assert "did not answer" in str(caught.value)
    assert domain.google.count(api="users.list") == 3


# --- the users -------------------------------------------------------------------------


def test_every_user_of_every_page_is_a_mailbox(domain: Domain) -> None:
    emails = [f"user{n:02d}@example.com" for n in range(8)]
    for email in emails:
        domain.google.add_user(email)
    domain.google.add_user("gone@example.com", suspended=True)
    mailboxes = domain.provider().list_mailboxes()
    assert [m.display_name for m in mailboxes] == sorted([ADMIN, "gone@example.com", *emails])
    assert {m.id for m in mailboxes} == {domain.google.user(m.display_name).id for m in mailboxes}
    assert domain.google.count(api="users.list") == 4  # 10 users, 3 a page
    skipped = {m.display_name: m.skip_reason for m in mailboxes if m.skip_reason}
    assert list(skipped) == ["gone@example.com"]
    assert "suspended" in skipped["gone@example.com"]


def test_include_and_exclude_patterns_are_case_insensitive_globs(domain: Domain) -> None:
    for email in [
        "Alice@Example.com",
        "bob@example.com",
        "carol@other.example",
        "BOBBY@example.com",
    ]:
        domain.google.add_user(email)
    provider = domain.provider(includeUsers=["*@EXAMPLE.COM"], excludeUsers=["bob*", "ADMIN@*"])
    assert [m.display_name for m in provider.list_mailboxes()] == ["Alice@Example.com"]


def test_a_user_whose_token_is_refused_is_an_unavailable_mailbox(domain: Domain) -> None:
    domain.google.add_user(ALICE)
    domain.add(ALICE, 3)
    domain.google.suspend(ALICE)  # after the listing: the Directory said active
    with pytest.raises(MailboxUnavailable) as caught:
        fetch_all(domain.provider(), domain.mailbox(ALICE))
    assert ALICE in str(caught.value)
    assert "invalid_grant" in str(caught.value)
    assert domain.google.count(api="messages.get") == 0


def test_a_user_without_gmail_is_an_unavailable_mailbox(domain: Domain) -> None:
    domain.google.add_user(ALICE, gmail=False)
    with pytest.raises(MailboxUnavailable) as caught:
        fetch_all(domain.provider(), domain.mailbox(ALICE))
    assert "Mail service not enabled" in str(caught.value)


def test_a_forbidden_mailbox_is_unavailable_but_a_rate_limit_403_is_not(domain: Domain) -> None:
    domain.google.add_user(ALICE)
    ids = domain.add(ALICE, 2)
    domain.google.fail_next(1, 403, reason="forbidden", api="users.getProfile")
    with pytest.raises(MailboxUnavailable) as caught:
        fetch_all(domain.provider(), domain.mailbox(ALICE))
    assert "403" in str(caught.value)
    domain.google.fail_next(2, 403, reason="userRateLimitExceeded", api="users.getProfile")
    assert set(fetched(fetch_all(domain.provider(), domain.mailbox(ALICE)))) == set(ids)


# --- import ----------------------------------------------------------------------------


def test_import_hands_over_every_message_once_with_its_labels_as_folders(domain: Domain) -> None:
    google = domain.google
    google.add_user(ALICE)
    projects = google.add_label(ALICE, "Projects/2024")
    accents = google.add_label(ALICE, "Données/Été")
    expected_paths: dict[str, set[str]] = {}

    def add(count: int, labels: Sequence[str], paths: set[str]) -> None:
        for message_id in domain.add(ALICE, count, labels):
            expected_paths[message_id] = paths

    add(9, ["INBOX", "UNREAD", "CATEGORY_PERSONAL"], {"INBOX"})
    add(4, ["SENT"], {"SENT"})
    add(2, ["DRAFT"], {"DRAFT"})
    add(5, [projects], {"Projects/2024"})
    add(3, [accents, "STARRED"], {"Données/Été"})
    add(4, ["INBOX", projects, accents, "IMPORTANT"], {"INBOX", "Projects/2024", "Données/Été"})
    add(3, ["UNREAD", "STARRED", "IMPORTANT", "CATEGORY_SOCIAL"], {"All Mail"})
    spam = domain.add(ALICE, 2, ["SPAM"])
    trash = domain.add(ALICE, 2, ["TRASH", projects])

    batches = fetch_all(domain.provider(), domain.mailbox(ALICE))
    got = fetched(batches)
    assert {i: paths for i, (_, paths) in got.items()} == expected_paths
    assert all(raw == domain.raw[i] for i, (raw, _) in got.items())
    # One get per message, raw, only the fields used; Spam and Trash never asked for.
    gets = [e for e in google.log if e.api == "messages.get"]
    assert sorted(google.requested_ids(ALICE)) == sorted(expected_paths)
    assert all(e.query["format"] == ["raw"] for e in gets)
    assert all(set(e.query["fields"][0].split(",")) == {"id", "labelIds", "raw"} for e in gets)
    assert not set(spam + trash) & set(google.requested_ids(ALICE))
    # getProfile came first, and its history id is where the next sync starts.
    gmail_calls = [e.api for e in google.log if e.email == ALICE and e.api != "token"]
    assert gmail_calls[0] == "users.getProfile"
    assert google.count(api="messages.list") == 3  # 30 listed, 10 a page
    final = batches[-1].cursor
    assert final == {"historyId": str(google.user(ALICE).history_id), "failed": []}
    assert not any(b.skipped or b.failed or b.known for b in batches)
    # One token for the user, though five threads fetched.
    assert [e.status for e in google.log if e.api == "token"] == [200]


def test_large_and_8bit_messages_arrive_byte_for_byte(domain: Domain) -> None:
    domain.google.add_user(ALICE)
    big = [
        b"Subject: big %d\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" % n
        + bytes(range(256)) * (12_000 * (n + 1))
        for n in range(3)
    ]
    ids = [domain.google.add_message(ALICE, raw) for raw in big]
    got = fetched(fetch_all(domain.provider(), domain.mailbox(ALICE)))
    assert [got[i][0] for i in ids] == big  # 3, 6 and 9 MB, every byte value


def test_include_spam_trash_archives_them_in_their_folders(domain: Domain) -> None:
    domain.google.add_user(ALICE)
    inbox = domain.add(ALICE, 3)
    spam = domain.add(ALICE, 2, ["SPAM"])
    trash = domain.add(ALICE, 2, ["TRASH"])
    got = fetched(fetch_all(domain.provider(includeSpamTrash=True), domain.mailbox(ALICE)))
    assert {i: p for i, (_, p) in got.items()} == {
        **{i: {"INBOX"} for i in inbox},
        **{i: {"SPAM"} for i in spam},
        **{i: {"TRASH"} for i in trash},
    }


def test_resuming_from_any_cursor_fetches_exactly_the_rest(
    domain: Domain, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(google_fetch, "BATCH_MESSAGES", 7)
    domain.google.add_user(ALICE)
    domain.add(ALICE, 45)
    mailbox = domain.mailbox(ALICE)
    batches = fetch_all(domain.provider(), mailbox)
    order = [m.provider_message_id for b in batches for m in b.messages]
    assert sorted(order) == sorted(domain.raw)
    assert [len(b.messages) for b in batches] == [7] * 6 + [3]
    for k in range(1, len(batches)):
        cursor = batches[k - 1].cursor
        domain.google.reset_log()
        # An archive that knows nothing: the cursor alone says what is done.
        rest = fetched(fetch_all(domain.provider(), mailbox, cursor))
        assert list(rest) == order[7 * k :]
        assert all(raw == domain.raw[i] for i, (raw, _) in rest.items())
        # Only the rest is downloaded, and the listing starts again on the cursor's page.
        assert sorted(domain.google.requested_ids(ALICE)) == sorted(order[7 * k :])
        first_list = next(e for e in domain.google.log if e.api == "messages.list")
        token = cursor["listing"]["pageToken"]
        assert first_list.query.get("pageToken") == ([token] if token else None)
        assert domain.google.count(api="messages.list") == 5 - (7 * k) // 10


def test_a_cursor_whose_page_token_expired_lists_again_downloading_only_the_rest(
    domain: Domain, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(google_fetch, "BATCH_MESSAGES", 7)
    domain.google.add_user(ALICE)
    domain.add(ALICE, 35)
    mailbox = domain.mailbox(ALICE)
    context = local_context(FAST_LIMITS)
    batches = []
    for batch in domain.provider().fetch(mailbox, None, context[0]):
        context[1].record([batch])
        batches.append(batch)
        if len(batches) == 3:  # 21 done: the cursor is on the third page
            break
    assert batches[-1].cursor["listing"]["pageToken"]
    domain.google.expire_page_tokens()
    domain.google.reset_log()
    rest = fetched(fetch_all(domain.provider(), mailbox, batches[-1].cursor, context))
    assert sorted([*fetched(batches), *rest]) == sorted(domain.raw)
    assert sorted(domain.google.requested_ids(ALICE)) == sorted(rest)
    statuses = [e.status for e in domain.google.log if e.api == "messages.list"]
    assert statuses == [400, 200, 200, 200, 200]


def test_a_failure_while_handing_a_message_over_leaves_the_cursor_before_it(
    domain: Domain,
) -> None:
    google = domain.google
    google.add_user(ALICE)
    older = domain.add(ALICE, 6)
    # A label id labels.list does not know: naming it lists the labels again, and
    # that call fails until the retries are used up.
    odd = domain.add(ALICE, 1, ["INBOX", "Label_404"])[0]
    newer = domain.add(ALICE, 5)
    google.fail_next(4, 500, api="labels.list", skip=1)  # 4: the attempts of one call
    ctx, archive = local_context(FAST_LIMITS)
    batches: list[Batch] = []
    with pytest.raises(ProviderUnavailable):
        for batch in domain.provider().fetch(domain.mailbox(ALICE), None, ctx):
            archive.record([batch])
            batches.append(batch)
    assert set(fetched(batches)) == set(newer)  # listed newest first, up to the odd one
    assert odd not in batches[-1].cursor["listing"]["done"]
    rest = fetched(fetch_all(domain.provider(), domain.mailbox(ALICE), batches[-1].cursor))
    assert set(rest) == {odd, *older}
    assert rest[odd][1] == {"INBOX"}


# --- sync --------------------------------------------------------------------------------


def test_sync_archives_new_mail_and_label_changes_without_downloading_again(
    domain: Domain,
) -> None:
    google = domain.google
    google.add_user(ALICE)
    archived = domain.add(ALICE, 12)
    trashed_before = domain.add(ALICE, 1, ["TRASH"])[0]
    mailbox = domain.mailbox(ALICE)
    context = local_context(FAST_LIMITS)
    first = fetch_all(domain.provider(), mailbox, None, context)
    assert set(fetched(first)) == set(archived)

    later = google.add_label(ALICE, "Later")
    new = domain.add(ALICE, 6, ["INBOX", "UNREAD"])
    google.modify_labels(ALICE, archived[0], add=[later])  # a folder: known, new path
    google.modify_labels(ALICE, archived[1], remove=["UNREAD"], add=["STARRED"])  # state only
    google.modify_labels(ALICE, archived[2], add=["TRASH"])  # to Trash: nothing to add
    google.modify_labels(ALICE, trashed_before, remove=["TRASH"])  # restored: archived now
    gone = domain.add(ALICE, 1)[0]
    google.delete_message(ALICE, gone)  # arrived and deleted between two syncs
    google.reset_log()

    second = fetch_all(domain.provider(), mailbox, first[-1].cursor, context)
    got = fetched(second)
    assert set(got) == {*new, trashed_before}
    assert all(raw == domain.raw[i] for i, (raw, _) in got.items())
    assert got[trashed_before][1] == {"All Mail"}
    assert [k for b in second for k in b.known] == [KnownMessage(archived[0], ("INBOX", "Later"))]
    assert sorted(google.requested_ids(ALICE)) == sorted([*new, trashed_before, gone])
    assert [u.provider_message_id for b in second for u in b.skipped] == [gone]
    assert google.count(api="history.list") == 3  # 12 records, 5 a page
    history = [e for e in google.log if e.api == "history.list"]
    assert history[0].query["startHistoryId"] == [first[-1].cursor["historyId"]]
    assert second[-1].cursor == {"historyId": str(google.user(ALICE).history_id), "failed": []}

    google.reset_log()
    third = fetch_all(domain.provider(), mailbox, second[-1].cursor, context)
    assert fetched(third) == {}
    assert google.count(api="messages.get") == 0


def test_an_expired_history_lists_again_and_downloads_only_what_is_missing(
    domain: Domain,
) -> None:
    google = domain.google
    google.add_user(ALICE)
    domain.add(ALICE, 25)
    mailbox = domain.mailbox(ALICE)
    context = local_context(FAST_LIMITS)
    first = fetch_all(domain.provider(), mailbox, None, context)
    new = domain.add(ALICE, 4)
    google.expire_history(ALICE)
    google.reset_log()

    second = fetch_all(domain.provider(), mailbox, first[-1].cursor, context)
    assert set(fetched(second)) == set(new)
    assert sorted(google.requested_ids(ALICE)) == sorted(new)
    assert [e.status for e in google.log if e.api == "history.list"] == [404]
    assert google.count(api="messages.list") == 3
    assert second[-1].cursor["historyId"] == str(google.user(ALICE).history_id)

    newer = domain.add(ALICE, 2)
    third = fetch_all(domain.provider(), mailbox, second[-1].cursor, context)
    assert set(fetched(third)) == set(newer)


def test_a_second_import_downloads_nothing(domain: Domain) -> None:
    domain.google.add_user(ALICE)
    domain.add(ALICE, 15)
    context = local_context(FAST_LIMITS)
    fetch_all(domain.provider(), domain.mailbox(ALICE), None, context)
    domain.google.reset_log()
    again = fetch_all(domain.provider(), domain.mailbox(ALICE), None, context)
    assert fetched(again) == {}
    assert domain.google.count(api="messages.get") == 0
    assert domain.google.count(api="messages.list") == 2


# --- messages that cannot be fetched --------------------------------------------------------


def test_a_message_gone_between_list_and_get_is_skipped(domain: Domain) -> None:
    domain.google.add_user(ALICE)
    ids = domain.add(ALICE, 12)
    for message_id in ids[3:5]:
        domain.google.vanish_on_get(ALICE, message_id)
    batches = fetch_all(domain.provider(), domain.mailbox(ALICE))
    assert set(fetched(batches)) == set(ids) - set(ids[3:5])
    skipped = [u for b in batches for u in b.skipped]
    assert sorted(u.provider_message_id for u in skipped) == sorted(ids[3:5])
    assert all("404" in u.reason for u in skipped)
    assert batches[-1].cursor["failed"] == []


@pytest.mark.parametrize("status", [500, 400])
def test_a_message_that_keeps_failing_is_failed_and_fetched_next_run(
    domain: Domain, status: int
) -> None:
    google = domain.google
    google.add_user(ALICE)
    ids = domain.add(ALICE, 14)
    broken = ids[6]
    google.break_message(ALICE, broken, status)
    mailbox = domain.mailbox(ALICE)
    context = local_context(FAST_LIMITS)
    first = fetch_all(domain.provider(), mailbox, None, context)
    assert set(fetched(first)) == set(ids) - {broken}
    assert [u.provider_message_id for b in first for u in b.failed] == [broken]
    assert first[-1].cursor["failed"] == [broken]
    attempts = 4 if status == 500 else 1  # a 400 is not retried, a 500 is
    assert google.requested_ids(ALICE).count(broken) == attempts

    still = fetch_all(domain.provider(), mailbox, first[-1].cursor, context)
    assert [u.provider_message_id for b in still for u in b.failed] == [broken]
    assert still[-1].cursor["failed"] == [broken]

    google.repair_message(ALICE, broken)
    fixed = fetch_all(domain.provider(), mailbox, still[-1].cursor, context)
    assert {i: raw for i, (raw, _) in fetched(fixed).items()} == {broken: domain.raw[broken]}
    assert fixed[-1].cursor["failed"] == []


def test_gmail_failing_every_message_stops_the_mailbox_keeping_what_was_done(
    domain: Domain,
) -> None:
    domain.google.add_user(ALICE)
    ids = domain.add(ALICE, 40)
    for message_id in ids[5:35]:  # listed newest first: these come after the first 5
        domain.google.break_message(ALICE, message_id, 503)
    provider = domain.provider()
    provider.retry_attempts = 1
    ctx, _ = local_context(FAST_LIMITS)
    batches: list[Batch] = []
    with pytest.raises(ProviderUnavailable) as caught:
        for batch in provider.fetch(domain.mailbox(ALICE), None, ctx):
            batches.append(batch)
    assert "in a row" in str(caught.value)
    listed = list(reversed(ids))
    assert set(fetched(batches)) == set(listed[:5])
    failed = [u.provider_message_id for b in batches for u in b.failed]
    assert failed == listed[5 : 5 + google_fetch.MAX_FAILURES_IN_A_ROW]
    assert batches[-1].cursor["failed"] == failed
    # Messages that failed before do not stop the next run, which reads the rest.
    rest = fetch_all(provider, domain.mailbox(ALICE), batches[-1].cursor)
    assert set(fetched(rest)) == set(listed[35:])
    assert sorted(rest[-1].cursor["failed"]) == sorted(listed[5:35])
    assert "listing" not in rest[-1].cursor


# --- backoff -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 403, 500, 502, 503])
def test_throttling_and_server_errors_are_retried_honouring_retry_after(
    domain: Domain, status: int
) -> None:
    domain.google.add_user(ALICE)
    ids = domain.add(ALICE, 8)
    domain.google.fail_next(2, status, api="messages.get", retry_after=3)
    domain.google.fail_next(1, status, api="messages.list")
    got = fetched(fetch_all(domain.provider(), domain.mailbox(ALICE)))
    assert {i: raw for i, (raw, _) in got.items()} == {i: domain.raw[i] for i in ids}
    assert domain.google.count(status=status) == 3
    assert len(domain.sleeps) == 3
    assert sorted(domain.sleeps)[-2:] >= [3.0, 3.0]


def test_revoked_delegation_mid_run_is_an_auth_error_and_the_next_run_resumes(
    domain: Domain,
) -> None:
    google = domain.google
    google.add_user(ALICE)
    domain.add(ALICE, 120)
    mailbox = domain.mailbox(ALICE)
    ctx, archive = local_context(FAST_LIMITS)
    batches: list[Batch] = []
    with pytest.raises(ProviderAuthError) as caught:
        for batch in domain.provider().fetch(mailbox, None, ctx):
            archive.record([batch])
            batches.append(batch)
            if len(batches) == 1:
                google.revoke_delegation()
    message = str(caught.value)
    assert "unauthorized_client" in message and "domain-wide delegation" in message
    assert DIRECTORY_SCOPE in message and GMAIL_SCOPE in message
    assert_no_secret(domain, *error_texts(caught.value))
    google.restore_delegation()
    rest = fetch_all(domain.provider(), mailbox, batches[-1].cursor, (ctx, archive))
    assert sorted([*fetched(batches), *fetched(rest)]) == sorted(domain.raw)


# --- quota -------------------------------------------------------------------------------


def test_one_user_is_read_at_the_quota_without_tripping_it(corpus: list[bytes]) -> None:
    with FakeGoogle(quota=True, max_in_flight_per_user=5, latency=0.01) as google:
        domain = Domain(google, corpus)
        google.add_user(ALICE)
        domain.add(ALICE, 150)
        provider = domain.provider()
        provider.retry_sleep = time.sleep
        ctx, archive = local_context(GoogleWorkspace.limits)
        started = time.monotonic()
        got = fetched(fetch_all(provider, domain.mailbox(ALICE), None, (ctx, archive)))
        elapsed = time.monotonic() - started
        assert {i: raw for i, (raw, _) in got.items()} == domain.raw
        gmail = [e for e in google.log if e.email == ALICE and e.api != "token"]
        assert google.throttled <= len(gmail) // 100
        units = google.user(ALICE).units
        # Within 250 units/s after the declared burst, and close to it.
        assert units <= 100 + 250 * elapsed
        assert units / elapsed >= 0.7 * 250
        assert google.user(ALICE).peak_in_flight <= 5


@pytest.mark.parametrize(("override", "peak"), [(None, 5), (2, 2)])
def test_requests_in_flight_per_user_follow_the_declared_limit(
    corpus: list[bytes], override: int | None, peak: int
) -> None:
    with FakeGoogle(latency=0.02, page_size=100) as google:
        domain = Domain(google, corpus)
        google.add_user(ALICE)
        domain.add(ALICE, 40)
        provider = domain.provider()
        if override is not None:
            overrides = {"gmail_user_in_flight": float(override)}
            provider.environment = replace(provider.environment, limit_overrides=overrides)
        got = fetched(fetch_all(provider, domain.mailbox(ALICE)))
        assert set(got) == set(domain.raw)
        assert google.user(ALICE).peak_in_flight == peak


# --- secrets -----------------------------------------------------------------------------

LIBRARY_LOGGERS = [
    "",
    "google",
    "google.auth",
    "google_auth_httplib2",
    "googleapiclient",
    "urllib3",
    "httplib2",
    "ingestion_grpc",
]


def test_the_key_and_tokens_never_reach_a_log_line(
    domain: Domain, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # google-auth stops "google" propagating unless someone configured it; configure it.
    monkeypatch.setattr(logging.getLogger("google"), "propagate", True)
    for name in LIBRARY_LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    google = domain.google
    google.add_user(ALICE)
    ids = domain.add(ALICE, 20)
    google.break_message(ALICE, ids[3], 500)
    google.fail_next(2, 429, api="messages.get")
    provider = domain.provider()
    provider.check_connection()
    provider.list_mailboxes()
    fetch_all(provider, domain.mailbox(ALICE))
    google.revoke_delegation()
    errors: list[BaseException] = []
    for attempt in (provider.check_connection, lambda: fetch_all(provider, domain.mailbox(ALICE))):
        with pytest.raises(ProviderAuthError) as caught:
            attempt()
        errors.append(caught.value)
    assert len(caplog.records) > 20  # the libraries did log
    assert any(r.name.startswith("google") for r in caplog.records)
    texts = [caplog.text] + [str(vars(r)) for r in caplog.records]
    texts += [t for e in errors for t in error_texts(e)]
    assert google.issued_tokens and google.assertions
    assert_no_secret(domain, *texts)
