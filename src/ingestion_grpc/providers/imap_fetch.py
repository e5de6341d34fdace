"""Reading a generic IMAP account: every folder, in batches, resumable from a cursor.

Per folder: EXAMINE (read-only, so nothing is marked \\Seen), compare UIDVALIDITY with
the cursor (a new value means the folder is read again from its first message: the
archive drops the repeats by content), find the UIDs after the cursor's `lastUid`
with UID SEARCH in bounded UID windows, ask their sizes (SIZES_PER_FETCH at a time),
and fetch `BODY.PEEK[]` for up to BATCH_MESSAGES messages / BATCH_BYTES bytes per
batch. Each batch carries the cursor that is true once it and every earlier batch
are archived (cursor shape in `imap_folders`).

A dropped connection (or a command the server refuses) costs one of a few reconnect
attempts, after which the folder continues right after the last UID handed out;
when they are used up the fetch raises ProviderUnavailable. A refused login raises
ProviderAuthError at once. A folder that cannot be opened (the server refuses to
SELECT it, or it cannot be named or read incrementally) does not stop the others:
they are read, then the fetch raises ProviderUnavailable (or ProviderDataError when
no retry can help) naming it, its cursor entry untouched.
"""

from __future__ import annotations

import contextlib
import imaplib
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from imapclient import IMAPClient
from imapclient.response_parser import parse_fetch_response

from ingestion_grpc.errors import (
    ConnectionCheckFailed,
    ProviderAuthError,
    ProviderDataError,
    ProviderUnavailable,
)
from ingestion_grpc.providers.base import Batch, FetchedMessage, JsonDict
from ingestion_grpc.providers.imap_folders import (
    MAX_UID,
    Folder,
    FolderState,
    cursor_json,
    parse_listing,
    read_cursor,
    select_folders,
)

logger = logging.getLogger(__name__)

BATCH_MESSAGES = 500
BATCH_BYTES = 25 * 1024 * 1024
# Messages whose sizes one UID FETCH asks for: a round trip per 5,000, not per batch.
SIZES_PER_FETCH = 5_000
# UIDs per UID SEARCH window. The window widens across gaps in the UIDs, up to
# SEARCH_SPAN_MAX: the reply (one line) must stay under imaplib's 1,000,000-byte limit.
SEARCH_SPAN = 5_000
SEARCH_SPAN_MAX = 65_536
# Seconds to wait before each reconnect; their number is the number of attempts.
RECONNECT_DELAYS: tuple[float, ...] = (0.5, 1.0, 2.0)
# Socket timeout while fetching: a server may think a while before sending a large
# message (the connection check keeps its shorter one).
TIMEOUT_SECONDS = 60.0

BODY = b"BODY[]"
_UID = re.compile(rb"\bUID (\d+)")
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")
_BODY_LITERAL = re.compile(rb"\bBODY\[\] \{\d+\}$")


class _NotConnected(Exception):
    """connect() failed for a reason other than the credentials."""


class _Incomplete(Exception):
    """The server left out messages that still exist."""


class _FolderRefused(Exception):
    """The server refuses to open a folder that it still lists."""


# What a reconnect may cure. imaplib.IMAP4.error covers IMAP4.abort (a dropped or
# garbled stream) and refused commands (NO / BAD); OSError covers socket, TLS and
# timeout errors.
TRANSIENT = (OSError, EOFError, imaplib.IMAP4.error, _NotConnected, _Incomplete)

T = TypeVar("T")
Disconnect = Callable[[IMAPClient], None]


class Connect(Protocol):
    """`imap.connect`: a logged-in client, or ProviderAuthError / ConnectionCheckFailed."""

    def __call__(self, config: Mapping[str, Any], *, timeout: float) -> IMAPClient: ...


def fetch_mailbox(
    config: Mapping[str, Any],
    cursor: JsonDict | None,
    *,
    connect: Connect,
    disconnect: Disconnect,
    where: str,
) -> Iterator[Batch]:
    """Yield the account's messages after `cursor`: folder by folder (sorted by path),
    oldest UID first. The connection is closed however the iteration ends."""
    state = read_cursor(cursor)
    session = _Session(config, connect, disconnect, where)
    refused: list[str] = []
    unreadable: list[str] = []
    try:
        folders = select_folders(
            session.run(_list_folders, "listing the folders"),
            config.get("includeFolders"),
            config.get("excludeFolders"),
        )
        for folder in folders:
            try:
                yield from _fetch_folder(session, folder, state)
            except _FolderRefused as exc:
                logger.warning("%s", exc)
                refused.append(str(exc))
            except ProviderDataError as exc:
                logger.warning("%s", exc)
                unreadable.append(str(exc))
    finally:
        session.close()
    if refused:
        raise ProviderUnavailable("; ".join(refused + unreadable) + " (other folders were read)")
    if unreadable:
        raise ProviderDataError("; ".join(unreadable) + " (other folders were read)")


def _list_folders(client: IMAPClient) -> list[Folder]:
    return parse_listing(client.list_folders())


def _fetch_folder(
    session: _Session, folder: Folder, state: dict[str, FolderState]
) -> Iterator[Batch]:
    """The folder's batches; after a failure, again from the last UID handed out."""
    if folder.wire is None:
        raise ProviderDataError(
            f"IMAP folder {folder.path!r} has a name that is not 7-bit modified UTF-7, "
            "so it cannot be opened; exclude it with excludeFolders to read the others"
        )
    while True:
        try:
            for batch in _folder_batches(session.client(), folder, state):
                yield batch
                session.succeeded()
            session.succeeded()
            return
        except TRANSIENT as exc:
            session.failed(exc, f"reading folder {folder.path!r}")


def _folder_batches(
    client: IMAPClient, folder: Folder, state: dict[str, FolderState]
) -> Iterator[Batch]:
    opened = _examine(client, folder)
    if opened is None:
        return
    saved = state.get(folder.name)
    last_uid = 0
    if saved is not None and saved.uidvalidity == opened.uidvalidity:
        last_uid = saved.last_uid
    elif saved is not None:
        logger.warning(
            "IMAP folder %r: UIDVALIDITY changed from %d to %d, reading it all again",
            folder.path,
            saved.uidvalidity,
            opened.uidvalidity,
        )
    if opened.exists == 0:
        return
    for uids in _uids_after(client, last_uid, opened.uidnext):
        for window in _chunks(uids, SIZES_PER_FETCH):
            sizes = _sizes(client, window)
            for group in _chunks(window, BATCH_MESSAGES):
                for part in _split_by_size(group, sizes):
                    messages = _bodies(client, folder, opened.uidvalidity, part)
                    state[folder.name] = FolderState(opened.uidvalidity, part[-1])
                    if messages:
                        yield Batch(messages, cursor_json(state))


@dataclass(frozen=True)
class _Opened:
    uidvalidity: int
    uidnext: int | None
    exists: int


def _examine(client: IMAPClient, folder: Folder) -> _Opened | None:
    """EXAMINE the folder; None (logged) when it was deleted since LIST."""
    assert folder.wire is not None
    try:
        info = client.select_folder(folder.wire, readonly=True)
    except imaplib.IMAP4.abort:
        raise
    except imaplib.IMAP4.error as exc:
        if _still_listed(client, folder):
            raise _FolderRefused(
                f"the IMAP server refused to open folder {folder.path!r} ({exc})"
            ) from exc
        logger.warning("IMAP folder %r was deleted while being read: skipped", folder.path)
        return None
    uidvalidity = info.get(b"UIDVALIDITY")
    if not isinstance(uidvalidity, int):
        raise ProviderDataError(
            f"IMAP folder {folder.path!r} has no UIDVALIDITY, so it cannot be read "
            "incrementally; exclude it with excludeFolders to read the others"
        )
    uidnext = info.get(b"UIDNEXT")
    exists = info.get(b"EXISTS")
    return _Opened(
        uidvalidity=uidvalidity,
        uidnext=uidnext if isinstance(uidnext, int) else None,
        exists=exists if isinstance(exists, int) else 1,
    )


def _still_listed(client: IMAPClient, folder: Folder) -> bool:
    return any(f.name == folder.name for f in parse_listing(client.list_folders("", folder.wire)))


def _uids_after(client: IMAPClient, last_uid: int, uidnext: int | None) -> Iterator[list[int]]:
    """The folder's UIDs above `last_uid`, ascending, one UID SEARCH window at a time.

    Windows end at UIDNEXT - 1; a last open-ended search (`N:*`) catches whatever
    came after EXAMINE (or a server whose UIDNEXT is wrong). `N:*` always matches the
    highest UID, even one below N: every result is filtered to its window.
    """
    start = last_uid + 1
    span = SEARCH_SPAN
    while start <= MAX_UID:
        end = min(start + span - 1, uidnext - 1, MAX_UID) if uidnext else None
        if end is not None and end < start:
            end = None
        found = client.search(["UID", f"{start}:{'*' if end is None else end}"])
        uids = sorted({u for u in found if u >= start and (end is None or u <= end)})
        if uids:
            yield uids
        if end is None:
            return
        if len(uids) * 4 < SEARCH_SPAN:
            span = min(span * 8, SEARCH_SPAN_MAX)
        elif len(uids) > SEARCH_SPAN:
            span = max(span // 4, SEARCH_SPAN)
        start = end + 1


def _sizes(client: IMAPClient, uids: Sequence[int]) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for item in _uid_fetch(client, uids, "(RFC822.SIZE)"):
        line = item[0] if isinstance(item, tuple) else item
        uid, size = _UID.search(line), _SIZE.search(line)
        if uid is not None and size is not None:
            sizes[int(uid.group(1))] = int(size.group(1))
    return sizes


def _split_by_size(uids: Sequence[int], sizes: Mapping[int, int]) -> Iterator[list[int]]:
    """Consecutive parts of at most BATCH_BYTES (a larger message is a part alone)."""
    part: list[int] = []
    total = 0
    for uid in uids:
        size = sizes.get(uid, 0)
        if part and total + size > BATCH_BYTES:
            yield part
            part, total = [], 0
        part.append(uid)
        total += size
    if part:
        yield part


def _bodies(
    client: IMAPClient, folder: Folder, uidvalidity: int, uids: Sequence[int]
) -> list[FetchedMessage]:
    """The raw messages, exactly as the server serves BODY[]; a UID left out must be
    one deleted meanwhile, else _Incomplete (and the part is fetched again)."""
    bodies = _bodies_by_uid(_uid_fetch(client, uids, "(BODY.PEEK[])"))
    messages: list[FetchedMessage] = []
    missing: list[int] = []
    for uid in uids:
        raw = bodies.get(uid)
        if isinstance(raw, bytes):
            messages.append(
                FetchedMessage(
                    raw=raw,
                    folder_paths=(folder.path,),
                    provider_message_id=f"{folder.path}:{uidvalidity}:{uid}",
                )
            )
        else:
            missing.append(uid)
    if missing:
        wanted = set(missing)
        still_there = sorted(u for u in client.search(["UID", _uid_set(missing)]) if u in wanted)
        if still_there:
            raise _Incomplete(
                f"the server did not return {len(still_there)} message(s) of folder "
                f"{folder.path!r} (UIDs {_uid_set(still_there)[:200]})"
            )
        logger.info(
            "IMAP folder %r: %d message(s) deleted before they could be read (UIDs %s)",
            folder.path,
            len(missing),
            _uid_set(missing)[:200],
        )
    return messages


def _uid_fetch(client: IMAPClient, uids: Sequence[int], items: str) -> list[Any]:
    """UID FETCH through imaplib, IMAPClient's connection: the untagged FETCH
    replies as imaplib hands them over, `(prefix, literal)` tuples and lines.

    IMAPClient's own `fetch` runs every reply through a byte-by-byte lexer, which
    cost more CPU than TLS and the rest of the fetch together; the shapes a server
    sends for these two requests are simple enough to read directly.
    """
    imap = client._imap
    status, data = imap.uid("FETCH", _uid_set(uids), items)
    if status != "OK":
        raise imaplib.IMAP4.error(f"UID FETCH {items} failed: {status} {data!r:.200}")
    return [item for item in data if item is not None]


def _bodies_by_uid(replies: list[Any]) -> dict[int, Any]:
    """`BODY[]` by UID from the replies to `UID FETCH … (BODY.PEEK[])`.

    The usual shape, `N (UID u BODY[] {size}` then the literal, is read with two
    regular expressions; anything else (the UID after the literal, say) goes
    through IMAPClient's parser, so no reply is misread.
    """
    bodies: dict[int, Any] = {}
    for item in replies:
        if not isinstance(item, tuple):
            continue  # ")" closing a reply, or an unsolicited FETCH (FLAGS)
        prefix, literal = item
        uid = _UID.search(prefix)
        if uid is None or _BODY_LITERAL.search(prefix) is None:
            parsed = parse_fetch_response(replies, normalise_times=False, uid_is_key=True)
            return {key: value.get(BODY) for key, value in parsed.items()}
        bodies[int(uid.group(1))] = literal
    return bodies


def _uid_set(uids: Sequence[int]) -> str:
    """[1, 2, 3, 7] -> "1:3,7" (ascending input)."""
    runs: list[str] = []
    first = previous = uids[0]
    for uid in [*uids[1:], None]:
        if uid is not None and uid == previous + 1:
            previous = uid
            continue
        runs.append(str(first) if first == previous else f"{first}:{previous}")
        if uid is not None:
            first = previous = uid
    return ",".join(runs)


def _chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for index in range(0, len(items), size):
        yield list(items[index : index + size])


class _Session:
    """One logged-in connection, reopened after a failure a few times."""

    def __init__(
        self, config: Mapping[str, Any], connect: Connect, disconnect: Disconnect, where: str
    ) -> None:
        self._config = config
        self._connect = connect
        self._disconnect = disconnect
        self._where = where
        self._password = str(config.get("password") or "")
        self._client: IMAPClient | None = None
        self._ever_connected = False
        self._failures = 0

    def client(self) -> IMAPClient:
        if self._client is None:
            try:
                client = self._connect(self._config, timeout=TIMEOUT_SECONDS)
            except ProviderAuthError:
                raise
            except ConnectionCheckFailed as exc:
                raise _NotConnected(str(exc)) from exc
            # Folder names stay as the server sent them (see imap_folders.Folder.wire).
            client.folder_encode = False
            # IMAPClient has imaplib trace every line it reads to a DEBUG logger:
            # a call per line of every message, for logs nobody may keep.
            client._imap.debug = 0
            self._client = client
            self._ever_connected = True
        return self._client

    def run(self, action: Callable[[IMAPClient], T], doing: str) -> T:
        while True:
            try:
                result = action(self.client())
            except TRANSIENT as exc:
                self.failed(exc, doing)
            else:
                self.succeeded()
                return result

    def succeeded(self) -> None:
        self._failures = 0

    def failed(self, exc: BaseException, doing: str) -> None:
        """Drop the connection, then wait before the next attempt or give up."""
        self._drop()
        detail = self._detail(exc)
        if not self._ever_connected:
            # The first connection failed: the engine retries later, with its backoff.
            raise ProviderUnavailable(f"IMAP server unavailable: {detail}") from exc
        self._failures += 1
        if self._failures > len(RECONNECT_DELAYS):
            raise ProviderUnavailable(
                f"IMAP server {self._where} failed while {doing}, and "
                f"{len(RECONNECT_DELAYS)} reconnects did not help: {detail}"
            ) from exc
        delay = RECONNECT_DELAYS[self._failures - 1]
        logger.warning(
            "IMAP connection to %s failed while %s (%s); reconnecting in %g s (%d of %d)",
            self._where,
            doing,
            detail,
            delay,
            self._failures,
            len(RECONNECT_DELAYS),
        )
        time.sleep(delay)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            self._disconnect(client)

    def _drop(self) -> None:
        # No LOGOUT: the stream may be mid-response or gone.
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.shutdown()

    def _detail(self, exc: BaseException) -> str:
        if isinstance(exc, _NotConnected | _Incomplete):
            text = str(exc)
        else:
            text = f"{type(exc).__name__}: {exc}"
        if self._password:
            text = text.replace(self._password, "***")
        return text[:500]
