"""generic_imap fetch against a real Dovecot: every message exactly once, byte for byte as
the server serves it, resumable from every cursor, and through dropped connections."""

from __future__ import annotations

import json
import mailbox
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from ingestion_grpc.errors import (
    ConnectionCheckFailed,
    InvalidArgument,
    ProviderAuthError,
    ProviderUnavailable,
)
from ingestion_grpc.providers import imap as imap_module
from ingestion_grpc.providers import imap_fetch
from ingestion_grpc.providers.base import Batch, FetchedMessage, Mailbox
from ingestion_grpc.providers.imap import GenericImap
from ingestion_grpc.providers.imap_folders import (
    folder_from_wire,
    parse_listing,
    read_cursor,
    select_folders,
)
from tests.support.dovecot import Dovecot, free_port
from tests.support.fetch_context import NO_CONTEXT, NO_ENVIRONMENT

# In CI, shared/ sits beside a fresh clone of the repository.
CORPORA = Path(__file__).resolve().parents[2].parent / "shared" / "corpora"
SPAM = CORPORA / "spamassassin-spam-1.mbox"

NON_ASCII = "Entwürfe/Größe"
LAYOUT = {"INBOX": 9, "Archive/2002": 7, NON_ASCII: 5}
BATCH = 4  # messages per batch in most tests, so every folder takes several batches


@pytest.fixture(scope="module")
def corpus() -> list[bytes]:
    box = mailbox.mbox(SPAM, create=False)
    try:
        return [box.get_bytes(key) for key in list(box.keys())[:150]]
    finally:
        box.close()


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch, dovecot: Dovecot) -> None:
    """Small batches, quick reconnects, and trust in the test server's certificate."""
    monkeypatch.setattr(imap_fetch, "BATCH_MESSAGES", BATCH)
    monkeypatch.setattr(imap_fetch, "RECONNECT_DELAYS", (0.05, 0.05, 0.05))
    monkeypatch.setenv("SSL_CERT_FILE", str(dovecot.cert_path))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


class Account:
    """A fresh Dovecot user with messages appended per folder, and what was appended."""

    def __init__(self, dovecot: Dovecot, corpus: list[bytes]) -> None:
        self.dovecot = dovecot
        self.user = dovecot.new_user("fetch")
        self._unused = iter(corpus)
        self.appended: dict[str, dict[int, bytes]] = {}

    def add(self, folder: str, count: int, *, flags: tuple[str, ...] = ()) -> list[bytes]:
        raws = [next(self._unused) for _ in range(count)]
        uids = self.dovecot.append(self.user, folder, raws, flags=flags)
        assert len(uids) == count
        self.appended.setdefault(folder, {}).update(zip(uids, raws, strict=True))
        return raws

    def provider(self, **config: Any) -> GenericImap:
        settings = {**self.dovecot.provider_config(self.user), **config}
        return GenericImap(GenericImap.validate_config(settings), NO_ENVIRONMENT)

    def fetch(self, cursor: dict[str, Any] | None = None, **config: Any) -> list[Batch]:
        return list(
            self.provider(**config).fetch(Mailbox(self.user, self.user), cursor, NO_CONTEXT)
        )

    def served(self, folder: str) -> dict[int, bytes]:
        """BODY[] of every message of `folder`, fetched directly."""
        with self.dovecot.client(self.user) as imap:
            imap.select_folder(folder, readonly=True)
            uids = imap.search(["ALL"])
            return {uid: data[b"BODY[]"] for uid, data in imap.fetch(uids, ["BODY.PEEK[]"]).items()}

    def flags(self, folder: str) -> dict[int, tuple[bytes, ...]]:
        with self.dovecot.client(self.user) as imap:
            imap.select_folder(folder, readonly=True)
            return dict(imap.get_flags(imap.search(["ALL"])))

    def uidvalidity(self, folder: str) -> int:
        return self.dovecot.status(self.user, folder)["uidvalidity"]


@pytest.fixture
def account(dovecot: Dovecot, corpus: list[bytes]) -> Account:
    account = Account(dovecot, corpus)
    for folder, count in LAYOUT.items():
        account.add(folder, count)
    return account


def messages(batches: list[Batch]) -> list[FetchedMessage]:
    return [message for batch in batches for message in batch.messages]


def ids(batches: list[Batch]) -> list[str]:
    return [message.provider_message_id for message in messages(batches)]


def uid_of(message: FetchedMessage) -> int:
    return int(message.provider_message_id.rsplit(":", 1)[1])


def per_folder(batches: list[Batch]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for message in messages(batches):
        counts[message.folder_paths[0]] = counts.get(message.folder_paths[0], 0) + 1
    return counts


def connections(dovecot: Dovecot, user: str) -> int:
    """`doveadm who`: one line per user, its second column counts the connections."""
    for line in dovecot.doveadm("who").splitlines():
        columns = line.split()
        if columns and columns[0] == user:
            return int(columns[1])
    return 0


# --- a full fetch ----------------------------------------------------------------------


def test_fetches_every_folder_exactly_as_the_server_serves_it(account: Account) -> None:
    account.add("INBOX", 3, flags=("\\Seen", "\\Flagged"))
    flags_before = {folder: account.flags(folder) for folder in LAYOUT}

    batches = account.fetch()

    assert per_folder(batches) == {"INBOX": 12, "Archive/2002": 7, NON_ASCII: 5}
    assert all(0 < len(batch.messages) <= BATCH for batch in batches)
    assert len(set(ids(batches))) == len(messages(batches))
    # Folders sorted by path (the \Noselect parents "Archive" and "Entwürfe" are not
    # read), each oldest UID first.
    order = [(m.folder_paths[0], uid_of(m)) for m in messages(batches)]
    assert order == sorted(order)
    assert messages(batches)[0].folder_paths == ("Archive/2002",)

    for folder in LAYOUT:
        served = account.served(folder)
        validity = account.uidvalidity(folder)
        got = {uid_of(m): m for m in messages(batches) if m.folder_paths[0] == folder}
        assert set(got) == set(served) == set(account.appended[folder])
        for uid, message in got.items():
            assert message.provider_message_id == f"{folder}:{validity}:{uid}"
            assert message.raw == served[uid]
            # Dovecot serves the LF-only corpus with CRLF line ends, otherwise unchanged.
            assert message.raw.replace(b"\r\n", b"\n") == account.appended[folder][uid]

    assert batches[-1].cursor == {
        "folders": {
            folder: {"uidvalidity": account.uidvalidity(folder), "lastUid": count}
            for folder, count in {"INBOX": 12, "Archive/2002": 7, NON_ASCII: 5}.items()
        }
    }
    assert json.loads(json.dumps(batches[-1].cursor)) == batches[-1].cursor
    # Read with EXAMINE and BODY.PEEK[]: no flag changed, \Seen included.
    assert {folder: account.flags(folder) for folder in LAYOUT} == flags_before
    assert any(b"\\Seen" in flags for flags in flags_before["INBOX"].values())
    assert not any(b"\\Seen" in flags for flags in flags_before["Archive/2002"].values())


def test_each_batch_cursor_covers_exactly_that_batch_and_the_ones_before(
    account: Account,
) -> None:
    batches = account.fetch()
    seen: dict[str, int] = {}
    for batch in batches:
        for message in batch.messages:
            seen[message.folder_paths[0]] = max(
                seen.get(message.folder_paths[0], 0), uid_of(message)
            )
        assert {k: v["lastUid"] for k, v in batch.cursor["folders"].items()} == seen
    # Every batch has its own cursor object: the engine may keep them.
    assert len({id(batch.cursor) for batch in batches}) == len(batches)


def test_resuming_from_every_cursor_yields_exactly_the_rest(account: Account) -> None:
    batches = account.fetch()
    everything = [(m.provider_message_id, m.raw) for m in messages(batches)]
    done = 0
    for index, batch in enumerate(batches):
        done += len(batch.messages)
        # As the engine stores it: through JSON (and numbers as floats, as through protobuf).
        cursor = json.loads(json.dumps(batch.cursor))
        if index % 2:
            cursor = json.loads(json.dumps(cursor), parse_int=float)
        rest = account.fetch(cursor)
        assert [(m.provider_message_id, m.raw) for m in messages(rest)] == everything[done:]
    assert done == sum(LAYOUT.values())


def test_new_messages_and_a_new_folder_come_after_the_final_cursor(account: Account) -> None:
    final = account.fetch()[-1].cursor
    account.add("INBOX", 2)
    account.add("Archive/2002", 1)
    account.add("Neu/Ordner", 5)

    batches = account.fetch(final)

    assert per_folder(batches) == {"INBOX": 2, "Archive/2002": 1, "Neu/Ordner": 5}
    assert sorted(uid_of(m) for m in messages(batches) if m.folder_paths[0] == "INBOX") == [10, 11]
    assert batches[-1].cursor["folders"]["Neu/Ordner"]["lastUid"] == 5
    assert account.fetch(batches[-1].cursor) == []


def test_changed_uidvalidity_rereads_that_folder_only(account: Account) -> None:
    final = account.fetch()[-1].cursor
    old = account.uidvalidity("Archive/2002")
    account.dovecot.set_uidvalidity(account.user, "Archive/2002", old + 1000)

    batches = account.fetch(final)

    assert per_folder(batches) == {"Archive/2002": 7}
    assert all(
        m.provider_message_id.startswith(f"Archive/2002:{old + 1000}:") for m in messages(batches)
    )
    cursor = batches[-1].cursor["folders"]
    assert cursor["Archive/2002"] == {"uidvalidity": old + 1000, "lastUid": 7}
    assert cursor["INBOX"] == final["folders"]["INBOX"]
    assert account.fetch(batches[-1].cursor) == []


def test_unreadable_cursor_entries_read_the_folder_again(account: Account) -> None:
    final = account.fetch()[-1].cursor
    broken = json.loads(json.dumps(final))
    broken["folders"]["INBOX"] = {"uidvalidity": "x", "lastUid": 3}
    assert per_folder(account.fetch(broken)) == {"INBOX": 9}
    assert per_folder(account.fetch({"something": "else"})) == LAYOUT


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (["Archive/*", "INBOX"], ["INBOX"], {"Archive/2002"}),
        (["Entwürfe/*"], None, {NON_ASCII}),
        (None, ["Entw*", "Archive/2002"], {"INBOX"}),
        (["inbox"], None, set()),  # globs are case-sensitive
    ],
)
def test_include_then_exclude_folders(
    account: Account, include: list[str] | None, exclude: list[str] | None, expected: set[str]
) -> None:
    config: dict[str, Any] = {"includeFolders": include, "excludeFolders": exclude}
    batches = account.fetch(**{k: v for k, v in config.items() if v is not None})
    assert set(per_folder(batches)) == expected
    assert per_folder(batches) == {folder: LAYOUT[folder] for folder in expected}


def test_batches_stay_under_the_byte_bound(
    account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(imap_fetch, "BATCH_BYTES", 12_000)
    batches = account.fetch()
    assert per_folder(batches) == LAYOUT
    for batch in batches:
        sizes = [len(m.raw) for m in batch.messages]
        assert len(sizes) == 1 or sum(sizes) <= 12_000, sizes
    assert any(len(batch.messages) < BATCH for batch in batches[:-1])


def test_uid_search_windows_cross_gaps(account: Account, monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows of 2 UIDs growing to 16, over a folder with a gap of deleted UIDs."""
    monkeypatch.setattr(imap_fetch, "SEARCH_SPAN", 2)
    monkeypatch.setattr(imap_fetch, "SEARCH_SPAN_MAX", 16)
    account.add("Gaps", 40)
    with account.dovecot.client(account.user) as imap:
        imap.select_folder("Gaps")
        imap.delete_messages(list(range(3, 36)))
        imap.expunge()
    searches: list[Any] = []
    real_search = imap_fetch._uids_after

    def counting(client: Any, last_uid: int, uidnext: int | None) -> Iterator[list[int]]:
        for uids in real_search(client, last_uid, uidnext):
            searches.append(uids)
            yield uids

    monkeypatch.setattr(imap_fetch, "_uids_after", counting)
    batches = account.fetch(includeFolders=["Gaps"])
    assert [uid_of(m) for m in messages(batches)] == [1, 2, 36, 37, 38, 39, 40]
    assert searches[0] == [1, 2]


# --- failures --------------------------------------------------------------------------


def test_connection_dropped_mid_fetch_resumes_without_loss_or_repeat(
    account: Account, caplog: pytest.LogCaptureFixture
) -> None:
    expected = ids(account.fetch())
    fetch = account.provider().fetch(Mailbox(account.user, account.user), None, NO_CONTEXT)
    got = ids([next(fetch)])
    for round_ in range(2):  # two drops, at different points
        account.dovecot.doveadm("kick", account.user)
        got += ids([next(fetch), next(fetch)] if round_ == 0 else list(fetch))
    assert got == expected
    assert "reconnecting" in caplog.text


def test_a_message_deleted_while_fetching_is_not_an_error(
    account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_sizes = imap_fetch._sizes
    deleted: list[int] = []

    def sizes_then_delete(client: Any, uids: list[int]) -> dict[int, int]:
        sizes = real_sizes(client, uids)
        if not deleted and len(uids) > 1:  # after the sizes, before the bodies
            deleted.append(uids[1])
            with account.dovecot.client(account.user) as other:
                other.select_folder("Archive/2002")
                other.delete_messages([uids[1]])
                other.expunge()
        return sizes

    monkeypatch.setattr(imap_fetch, "_sizes", sizes_then_delete)
    batches = account.fetch()
    assert deleted == [2]
    archive = sorted(uid_of(m) for m in messages(batches) if m.folder_paths[0] == "Archive/2002")
    assert archive == [1, 3, 4, 5, 6, 7]
    assert per_folder(batches) == {**LAYOUT, "Archive/2002": 6}


def test_a_folder_deleted_between_list_and_select_is_skipped(
    account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    account.add("Doomed", 2)
    real_list = imap_fetch._list_folders

    def list_then_delete(client: Any) -> Any:
        listed = real_list(client)
        with account.dovecot.client(account.user) as other:
            other.delete_folder("Doomed")
        return listed

    monkeypatch.setattr(imap_fetch, "_list_folders", list_then_delete)
    batches = account.fetch()
    assert per_folder(batches) == LAYOUT


def test_a_folder_the_server_refuses_to_open_does_not_stop_the_others(
    account: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_select = IMAPClient.select_folder

    def select(client: IMAPClient, folder: Any, readonly: bool = False) -> Any:
        if folder == "Archive/2002":
            raise IMAPClientError("select failed: [UNAVAILABLE] try later (test)")
        return real_select(client, folder, readonly)

    monkeypatch.setattr(IMAPClient, "select_folder", select)
    fetch = account.provider().fetch(Mailbox(account.user, account.user), None, NO_CONTEXT)
    batches: list[Batch] = []
    with pytest.raises(ProviderUnavailable) as caught:
        for batch in fetch:
            batches.append(batch)
    assert per_folder(batches) == {"INBOX": 9, NON_ASCII: 5}
    assert "Archive/2002" not in batches[-1].cursor["folders"]
    assert "refused to open folder 'Archive/2002'" in str(caught.value)
    assert "[UNAVAILABLE] try later" in str(caught.value)


def test_changed_password_is_an_auth_error(account: Account) -> None:
    provider = account.provider()
    account.dovecot.set_password(account.user, "a-new-password-1")
    with pytest.raises(ProviderAuthError) as caught:
        list(provider.fetch(Mailbox(account.user, account.user), None, NO_CONTEXT))
    assert account.dovecot.provider_config(account.user)["password"] not in str(caught.value)
    assert provider.config["password"] not in str(caught.value)


def test_password_changed_before_a_reconnect_is_an_auth_error(account: Account) -> None:
    fetch = account.provider().fetch(Mailbox(account.user, account.user), None, NO_CONTEXT)
    next(fetch)
    account.dovecot.set_password(account.user, "another-new-password-2")
    account.dovecot.doveadm("kick", account.user)
    with pytest.raises(ProviderAuthError):
        list(fetch)


def test_unreachable_server_is_unavailable(account: Account) -> None:
    with pytest.raises(ProviderUnavailable) as caught:
        account.fetch(port=free_port())
    assert "connection refused" in str(caught.value)
    assert account.dovecot.password(account.user) not in str(caught.value)


def test_gives_up_after_a_few_reconnects(account: Account, monkeypatch: pytest.MonkeyPatch) -> None:
    real_connect = imap_module.connect
    calls: list[int] = []

    def connect_once(config: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) > 1:
            raise ConnectionCheckFailed("connection refused by 127.0.0.1:1 (test)")
        return real_connect(config, **kwargs)

    monkeypatch.setattr(imap_module, "connect", connect_once)
    fetch = account.provider().fetch(Mailbox(account.user, account.user), None, NO_CONTEXT)
    next(fetch)
    account.dovecot.doveadm("kick", account.user)
    with pytest.raises(ProviderUnavailable) as caught:
        list(fetch)
    assert len(calls) == 1 + len(imap_fetch.RECONNECT_DELAYS)
    assert "3 reconnects did not help" in str(caught.value)
    assert account.dovecot.password(account.user) not in str(caught.value)


def test_closing_the_generator_early_logs_out(account: Account) -> None:
    fetch = account.provider().fetch(Mailbox(account.user, account.user), None, NO_CONTEXT)
    assert isinstance(fetch, Generator)
    next(fetch)
    wait_for(lambda: connections(account.dovecot, account.user) == 1)
    fetch.close()
    wait_for(lambda: connections(account.dovecot, account.user) == 0)


def test_mailboxes_are_the_account(account: Account) -> None:
    provider = account.provider()
    assert provider.list_mailboxes() == [Mailbox(account.user, account.user)]
    with pytest.raises(InvalidArgument):
        provider.fetch(
            Mailbox("someone-else@example.com", "someone-else@example.com"), None, NO_CONTEXT
        )


# --- folder names and cursors, without a server ------------------------------------------


def test_folder_names_from_the_wire() -> None:
    nested = folder_from_wire(b"Entw&APw-rfe/Gr&APYA3w-e", b"/")
    assert (nested.path, nested.name, nested.wire) == (
        NON_ASCII,
        NON_ASCII,
        "Entw&APw-rfe/Gr&APYA3w-e",
    )
    dotted = folder_from_wire(b"INBOX.Sent &- Old", b".")
    assert (dotted.path, dotted.name) == ("INBOX/Sent & Old", "INBOX.Sent & Old")
    # Not canonical modified UTF-7: kept as sent, so SELECT gets exactly that back.
    assert folder_from_wire(b"a&b", b"/").name == "a&b"
    assert folder_from_wire(42, None).wire == "42"
    assert folder_from_wire("Entwürfe".encode(), b"/").wire is None

    listed = parse_listing(
        [
            ((b"\\HasNoChildren",), b"/", b"INBOX"),
            ((b"\\Noselect", b"\\HasChildren"), b"/", b"Archive"),
            ((b"\\NonExistent",), b"/", b"Gone"),
            ((b"\\HasNoChildren",), b"/", b"Archive/2002"),
            ((b"\\HasNoChildren",), b"/", b"Archive/2002"),
        ]
    )
    assert [f.path for f in listed] == ["Archive/2002", "INBOX"]
    assert [f.path for f in select_folders(listed, ["*"], ["INBOX"])] == ["Archive/2002"]


def test_cursor_reading() -> None:
    assert read_cursor(None) == {}
    state = read_cursor(
        {
            "folders": {
                "INBOX": {"uidvalidity": 5.0, "lastUid": 7},
                "Bad": {"uidvalidity": -1, "lastUid": 7},
                "Worse": {"uidvalidity": True, "lastUid": 7},
                "Worst": [1, 2],
            }
        }
    )
    assert {name: (s.uidvalidity, s.last_uid) for name, s in state.items()} == {"INBOX": (5, 7)}


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
