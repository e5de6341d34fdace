"""Reading one Exchange Online mailbox through Graph: a delta round per folder, and
every new message's MIME, in batches whose cursor is true once archived (folders and
the cursor's shape: `graph_folders`).

Message ids are immutable ids (`Prefer: IdType="ImmutableId"`), so a message moved to
another folder keeps its id. Per delta page the archive is asked which ids it holds
already: those are handed over as `KnownMessage`s (the folder path merged, nothing
downloaded) and the others are downloaded, as many at a time as the mailbox's
concurrency limit allows, handed over in page order. A batch ends with its page (or
earlier, at BATCH_MESSAGES / BATCH_BYTES or BATCH_SECONDS after the last one, with
the page's handed-out ids in the cursor). An expired delta token (410,
syncStateNotFound, resyncRequired, syncStateInvalid) starts that folder's round
again: everything in it is listed again, and only ids the archive does not hold are
downloaded. `@removed` entries are
ignored: an archive keeps what it archived.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ingestion_grpc.errors import ProviderDataError, ProviderUnavailable
from ingestion_grpc.providers.base import (
    ArchiveLookup,
    Batch,
    FetchedMessage,
    JsonDict,
    KnownMessage,
    Unfetched,
)
from ingestion_grpc.providers.concurrent import fetch_in_order
from ingestion_grpc.providers.graph_client import (
    GraphClient,
    GraphError,
    MailboxGate,
    Throttled,
)
from ingestion_grpc.providers.graph_folders import (
    FolderState,
    GraphFolder,
    cursor_json,
    mailbox_error,
    no_mailbox,
    read_cursor,
)
from ingestion_grpc.providers.retries import RetryLater

logger = logging.getLogger(__name__)

DELTA_PAGE = 100
# A batch ends at the end of a delta page, or earlier at these sizes.
BATCH_MESSAGES = 100
BATCH_BYTES = 32 * 1024 * 1024
# Paced at 16 requests/s, a page of 100 takes 6 s or more: the cursor, the run's
# counters and the mailbox's heartbeat (which the engine takes from batches, and
# its watchdog reads) then move every couple of seconds, whatever the pace.
BATCH_SECONDS = 2.0
# Downloaded bytes that may wait for their turn (in order) besides those in flight.
MAX_BYTES_WAITING = 32 * 1024 * 1024
# Attempts per $value; a message still failing after them is counted failed, kept in
# the cursor and fetched again on the next run.
VALUE_ATTEMPTS = 5

# Steps (a download each, or a page's end) the delta pages are read ahead of the
# downloads, in a thread of their own: the next page (and the next folder's first)
# is asked for while the current one's messages download, so the mailbox's places
# stay busy rather than idling for one round trip a page.
STEPS_AHEAD = DELTA_PAGE + 2

# Ids handed out that a fetch remembers. Those not yet in the archive are a few
# batches' worth at most (about 400): the steps read ahead, the downloads in flight,
# the batch being assembled, the one the engine reads ahead and the one it commits.
# Memory stays the same for 1,000 or 100,000 messages (ids of real Graph are ~150
# characters). An id
# forgotten too early is looked up in the archive again, and at worst downloaded
# once more: the archive still keeps one copy (same bytes, same mailbox).
HANDED_KEPT = 1_000

# Rounds of one folder started again in one fetch before Graph is deemed broken.
MAX_RESTARTS = 3

PREFER_IMMUTABLE = 'IdType="ImmutableId"'
RESYNC_CODES = frozenset({"syncstatenotfound", "resyncrequired", "syncstateinvalid"})


@dataclass(frozen=True)
class _Seen:
    """An id of a delta page handed over without a download: the archive has it, or
    (`earlier`) this fetch downloaded it from another folder."""

    folder: str
    page: str
    id: str
    earlier: bool = False


@dataclass(frozen=True)
class _Advance:
    """A delta page is done: the folder continues at `next_link` or is up to date."""

    folder: str
    next_link: str | None
    delta_link: str | None


@dataclass(frozen=True)
class _Restart:
    folder: str


@dataclass(frozen=True)
class _Gone:
    folder: str


_Event = _Seen | _Advance | _Restart | _Gone


@dataclass(frozen=True)
class _Download:
    folder: str
    # The link of the delta page that listed it; None for a retry from `failed`.
    page: str | None
    id: str


@dataclass(frozen=True)
class _Step:
    """Events to apply in order, then at most one download."""

    events: tuple[_Event, ...]
    download: _Download | None = None


@dataclass(frozen=True)
class _Outcome:
    raw: bytes | None = None
    gone: str = ""
    failing: str = ""


class MailboxSync:
    """One fetch of one mailbox."""

    def __init__(
        self,
        client: GraphClient,
        user_id: str,
        gate: MailboxGate,
        archive: ArchiveLookup,
        *,
        concurrency: int,
        name: str = "graph-fetch",
    ) -> None:
        self.client = client
        self.user = quote(user_id, safe="")
        self.gate = gate
        self.archive = archive
        self.concurrency = max(1, concurrency)
        self.name = name
        # Ids downloaded (or retried) in this fetch, by folder: the archive may not
        # have stored them yet when a later page lists them again. Only the latest
        # HANDED_KEPT: older ones are in the archive by now, and a mailbox of 100,000
        # messages must not keep 100,000 ids in memory.
        self._handed: OrderedDict[str, str] = OrderedDict()

    def batches(
        self,
        folders: Sequence[GraphFolder],
        cursor: Mapping[str, Any] | None,
    ) -> Iterator[Batch]:
        saved = read_cursor(cursor)
        states: dict[str, FolderState] = {}
        for folder in folders:
            state = saved.get(folder.id) or FolderState(folder.path)
            state.path = folder.path
            states[folder.id] = state
        assembler = _Assembler(states, cursor_json(saved) if cursor else None)
        steps = _Ahead(self._steps(folders, states), STEPS_AHEAD, name=f"{self.name}-delta")
        ordered = fetch_in_order(
            self._download,
            steps,
            max_in_flight=self.concurrency,
            size_of=lambda o: len(o.raw) if o is not None and o.raw is not None else 0,
            max_bytes_waiting=MAX_BYTES_WAITING,
            name=self.name,
        )
        try:
            for step, outcome in ordered:
                yield from assembler.apply(step, outcome)
        finally:
            # Closed with this fetch (the engine ends a time slice, a worker stops):
            # wait for the downloads in flight now, not whenever it is collected.
            if isinstance(ordered, Generator):
                ordered.close()
            steps.close()
        yield from assembler.finish()

    def _steps(
        self, folders: Sequence[GraphFolder], states: Mapping[str, FolderState]
    ) -> Generator[_Step, None, None]:
        # Retries first, for every folder: a message that failed in one folder and has
        # moved to another since is then downloaded once, not once per folder.
        for folder in folders:
            for message_id in list(states[folder.id].failed):
                if message_id not in self._handed:
                    self._hand(message_id, folder.id)
                    yield _Step((), _Download(folder.id, None, message_id))
        for folder in folders:
            yield from self._delta(folder, states[folder.id])

    def _delta(self, folder: GraphFolder, state: FolderState) -> Iterator[_Step]:
        start = self.client.url(
            f"/users/{self.user}/mailFolders/{quote(folder.id, safe='')}/messages/delta?$select=id"
        )
        link = state.next_link or state.delta_link or start
        skip = set(state.seen) if state.next_link else set()
        prefer = f"{PREFER_IMMUTABLE}, odata.maxpagesize={DELTA_PAGE}"
        events: list[_Event] = []
        restarts = 0
        while True:
            what = f"reading the changes of folder {folder.path!r}"
            try:
                page = self.client.get_json(
                    self.client.absolute(link), what=what, gate=self.gate, prefer=prefer
                )
            except GraphError as exc:
                expired = exc.status == 410 or exc.code.casefold() in RESYNC_CODES
                if expired and link != start and restarts < MAX_RESTARTS:
                    restarts += 1
                    logger.warning(
                        "folder %r: delta token expired (%s %s), listing the folder again",
                        folder.path,
                        exc.status,
                        exc.code,
                    )
                    events.append(_Restart(folder.id))
                    link, skip = start, set()
                    continue
                if exc.status == 404 and not no_mailbox(exc):
                    logger.info("folder %r went away before its changes were read", folder.path)
                    yield _Step((*events, _Gone(folder.id)))
                    return
                raise mailbox_error(exc) from None
            except Throttled as exc:
                raise ProviderUnavailable(
                    f"Microsoft Graph keeps throttling: {exc.reason}"
                ) from None
            except RetryLater as exc:
                raise ProviderUnavailable(f"Microsoft Graph keeps failing: {exc.reason}") from None
            ids = [i for i in _listed_ids(page) if i not in skip]
            skip = set()
            fresh = [i for i in ids if i not in self._handed]
            archived = self.archive.archived_ids(fresh) if fresh else set()
            for message_id in ids:
                before = self._handed.get(message_id)
                if before == folder.id:
                    continue  # handed over from this folder already in this fetch
                if before is not None or message_id in archived:
                    events.append(_Seen(folder.id, link, message_id, earlier=before is not None))
                    continue
                self._hand(message_id, folder.id)
                yield _Step(tuple(events), _Download(folder.id, link, message_id))
                events = []
            next_link, delta_link = page.get("@odata.nextLink"), page.get("@odata.deltaLink")
            if isinstance(next_link, str):
                events.append(_Advance(folder.id, next_link, None))
                yield _Step(tuple(events))
                events = []
                link = next_link
                continue
            if isinstance(delta_link, str):
                yield _Step((*events, _Advance(folder.id, None, delta_link)))
                return
            raise ProviderDataError(
                f"{what}: Microsoft Graph answered a delta page without a nextLink or deltaLink"
            )

    def _hand(self, message_id: str, folder_id: str) -> None:
        self._handed[message_id] = folder_id
        while len(self._handed) > HANDED_KEPT:
            self._handed.popitem(last=False)

    def _download(self, step: _Step) -> _Outcome | None:
        if step.download is None:
            return None
        message = quote(step.download.id, safe="")
        url = self.client.url(f"/users/{self.user}/messages/{message}/$value")
        try:
            raw = self.client.get_bytes(
                url,
                what="downloading a message",
                gate=self.gate,
                prefer=PREFER_IMMUTABLE,
                attempts=VALUE_ATTEMPTS,
            )
        except GraphError as exc:
            if exc.status == 404:
                return _Outcome(gone=f"gone from the mailbox before it was downloaded ({exc.code})")
            return _Outcome(
                failing=f"Microsoft Graph refused to serve it ({exc.status} {exc.code})"
            )
        except Throttled as exc:
            # Throttled past every attempt: the whole mailbox is over its limits.
            raise ProviderUnavailable(f"Microsoft Graph keeps throttling: {exc.reason}") from None
        except RetryLater as exc:
            return _Outcome(failing=exc.reason)
        return _Outcome(raw=raw)


class _Ahead:
    """Iterates `source` in a thread of its own, up to `size` items ahead of the caller.

    The thread alone advances and closes `source`. An exception raised by `source` is
    raised again, in order, where the caller asks for the item it was reading.
    `close()` stops the thread at its next item; one request it has in flight then
    finishes unread, as it would in any thread.
    """

    _END = object()

    def __init__(self, source: Generator[_Step, None, None], size: int, *, name: str) -> None:
        self._source = source
        self._items: queue.Queue[Any] = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        # In a copy of the caller's context: its log lines and metrics name the
        # mailbox and provider the engine is working for.
        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._read,), name=name, daemon=True
        )
        self._thread.start()

    def __iter__(self) -> Iterator[_Step]:
        return self

    def __next__(self) -> _Step:
        if self._stop.is_set():
            raise StopIteration
        item = self._items.get()
        if item is self._END:
            self._stop.set()
            raise StopIteration
        if isinstance(item, BaseException):
            self._stop.set()
            raise item
        assert isinstance(item, _Step)
        return item

    def close(self) -> None:
        self._stop.set()

    def _read(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as error:  # raised again in the caller's thread
            self._put(error)
        finally:
            self._source.close()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._items.put(item, timeout=0.1)
            except queue.Full:
                continue
            return True
        return False


def _listed_ids(page: JsonDict) -> list[str]:
    """The ids of a delta page's messages in page order, once each, without @removed."""
    items = page.get("value")
    if not isinstance(items, list):
        raise ProviderDataError("Microsoft Graph answered a delta page without a value list")
    ids = (item.get("id") for item in items if isinstance(item, dict) and "@removed" not in item)
    return list(dict.fromkeys(i for i in ids if isinstance(i, str) and i))


class _Assembler:
    """Turns steps and their outcomes, in order, into batches with true cursors."""

    def __init__(self, states: dict[str, FolderState], cursor_in: JsonDict | None) -> None:
        self.states = states
        self.cursor_in = cursor_in
        # Whether each download of this fetch succeeded, by message id: the latest
        # ones, enough for every id the steps may still name (see HANDED_KEPT).
        self.fetched: OrderedDict[str, bool] = OrderedDict()
        # The page each folder's `seen` belongs to.
        self.page: dict[str, str] = {
            folder_id: state.next_link
            for folder_id, state in states.items()
            if state.next_link and state.seen
        }
        self._reset()

    def _reset(self) -> None:
        self.cut_at = time.monotonic()
        self.messages: list[FetchedMessage] = []
        self.known: list[KnownMessage] = []
        self.skipped: list[Unfetched] = []
        self.failed: list[Unfetched] = []
        self.pending: set[str] = set()
        self.bytes = 0

    def apply(self, step: _Step, outcome: _Outcome | None) -> Iterator[Batch]:
        for event in step.events:
            if isinstance(event, _Seen):
                self._see(event.folder, event.page, event.id)
                # Listed again after its download here failed: it is in no archive
                # (the engine refuses such a KnownMessage); the other folder's
                # `failed` entry fetches it on the next run.
                if not event.earlier or self.fetched.get(event.id, False):
                    if event.id in self.pending:
                        # Its bytes are in this very batch: archive them first.
                        yield self._batch()
                    path = self.states[event.folder].path
                    self.known.append(KnownMessage(event.id, (path,)))
            elif isinstance(event, _Advance):
                state = self.states[event.folder]
                state.next_link, state.delta_link = event.next_link, event.delta_link
                state.seen = []
                self.page.pop(event.folder, None)
                if self._has_content():
                    yield self._batch()
            elif isinstance(event, _Restart):
                state = self.states[event.folder]
                state.next_link = state.delta_link = None
                state.seen = []
                self.page.pop(event.folder, None)
            else:
                self.states.pop(event.folder, None)
                self.page.pop(event.folder, None)
        if step.download is None or outcome is None:
            if self._due():
                yield self._batch()
            return
        download = step.download
        state = self.states[download.folder]
        if download.page is not None:
            self._see(download.folder, download.page, download.id)
        retry = download.page is None
        self.fetched[download.id] = outcome.raw is not None
        self.fetched.move_to_end(download.id)
        while len(self.fetched) > 2 * HANDED_KEPT:
            self.fetched.popitem(last=False)
        if outcome.raw is not None:
            self.messages.append(FetchedMessage(outcome.raw, (state.path,), download.id))
            self.pending.add(download.id)
            self.bytes += len(outcome.raw)
        elif outcome.gone:
            self.skipped.append(Unfetched(download.id, outcome.gone))
        else:
            self.failed.append(Unfetched(download.id, outcome.failing))
            logger.warning("message in folder %r failed: %s", state.path, outcome.failing)
            if download.id not in state.failed:
                state.failed.append(download.id)
        if retry and not outcome.failing:
            for other in self.states.values():  # an older cursor may list it twice
                if download.id in other.failed:
                    other.failed.remove(download.id)
        if self.bytes >= BATCH_BYTES or len(self.messages) >= BATCH_MESSAGES or self._due():
            yield self._batch()

    def finish(self) -> Iterator[Batch]:
        cursor = cursor_json(self.states)
        if self._has_content() or cursor != self.cursor_in:
            yield self._batch()

    def _see(self, folder: str, page: str, message_id: str) -> None:
        state = self.states[folder]
        if self.page.get(folder) != page:
            self.page[folder] = page
            state.seen = []
        state.next_link, state.delta_link = page, None
        state.seen.append(message_id)

    def _has_content(self) -> bool:
        return bool(self.messages or self.known or self.skipped or self.failed)

    def _due(self) -> bool:
        return self._has_content() and time.monotonic() - self.cut_at >= BATCH_SECONDS

    def _batch(self) -> Batch:
        batch = Batch(
            messages=self.messages,
            cursor=cursor_json(self.states),
            known=self.known,
            skipped=self.skipped,
            failed=self.failed,
        )
        self.cursor_in = batch.cursor
        self._reset()
        return batch
