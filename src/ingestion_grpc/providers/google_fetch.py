"""Reading one user's Gmail: an import that lists every page, then a sync through
the history API, both resumable from the cursor of any batch.

Import: `users.getProfile` first (its `historyId` is where the next sync starts),
then `messages.list` page after page, and one `messages.get(format=raw)` per id
the archive does not hold yet (`context.archive.archived_ids`), several in flight
(`fetch_in_order`) and handed over in listed order. The ids it holds (a second
import, a listing after the history expired) are handed over as known, without
folder paths: nothing is downloaded, and the run counts them as already present.

Sync: `history.list` from the stored `historyId` through every page; messages
added, and messages whose labels changed: one not archived yet (restored from
Trash or Spam, say) is downloaded, one archived that gained a folder-like label is
reported as known with its folder paths, without downloading it again. The next
start is the `historyId` the first response reports: the mailbox's history id
when the listing began. Records after it that this run already handled come back
next time and cost a listing entry only (the archive says they are archived), but
nothing after it can be missed, whether Google's pages are a snapshot or live. A
404 (the history id expired) is a new listing that downloads only what the
archive lacks.

The cursor (`google_gmail`) keeps the page being listed and the ids of it done,
so a killed worker resumes on the same page with nothing fetched twice. A
message whose get keeps failing (after the retries) goes to `failed` in its
batch and is tried again at the start of the next run; one that answers 404 is
counted skipped. Only many new failures in a row (Gmail failing, not a message)
stop the mailbox, with ProviderUnavailable; what was handed over stays archived.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ingestion_grpc.errors import MailboxUnavailable, ProviderAuthError, ProviderUnavailable
from ingestion_grpc.providers.base import (
    Batch,
    FetchContext,
    FetchedMessage,
    JsonDict,
    KnownMessage,
    Unfetched,
)
from ingestion_grpc.providers.concurrent import fetch_in_order
from ingestion_grpc.providers.google_api import ApiRefused, TokenRefused
from ingestion_grpc.providers.google_gmail import (
    GmailUser,
    Listing,
    State,
    cursor_json,
    decode_raw,
    read_cursor,
)
from ingestion_grpc.providers.google_labels import SPAM_AND_TRASH, LabelNames, is_folder_label
from ingestion_grpc.providers.retries import RetryLater

logger = logging.getLogger(__name__)

BATCH_MESSAGES = 50
BATCH_BYTES = 16 * 1024 * 1024
# Ids handed over without bytes (already archived, skipped, failed) per batch at most.
BATCH_ENTRIES = 500
# Raw messages fetched ahead of the one being handed over, by size (a 40 MB
# message is 54 MB of JSON while it is decoded; the in-flight ones come on top).
MAX_BYTES_WAITING = 32 * 1024 * 1024
# Consecutive messages failing after their retries: Gmail is failing, not a message.
MAX_FAILURES_IN_A_ROW = 20
# The archive is asked about this many ids at once.
LOOKUP_CHUNK = 1000
# Fetches under way per request that may be in flight (see `_hand_over_all`).
FETCH_WINDOW = 2

# How a refused token becomes the provider's error (it knows the key and the admin).
TokenRefusal = Callable[[TokenRefused, str], Exception]


@dataclass(frozen=True)
class _Got:
    raw: bytes
    label_ids: tuple[str, ...]


@dataclass(frozen=True)
class _Missed:
    reason: str
    gone: bool  # True: no longer in the mailbox (skipped); False: failing for now


@dataclass(frozen=True)
class _Item:
    id: str
    fetch: bool = True
    # Listing: the id is on the page that `page_token` lists (None: the first page).
    listed: bool = False
    page_token: str | None = None
    # Sync: an archived message reported as known with these folder paths.
    known_paths: tuple[str, ...] | None = None
    # It failed on an earlier run: failing again says nothing about Gmail now.
    retry: bool = False


@dataclass
class _Change:
    label_ids: tuple[str, ...] = ()
    folder_added: bool = False


@dataclass
class _Pending:
    messages: list[FetchedMessage] = field(default_factory=list)
    known: list[KnownMessage] = field(default_factory=list)
    skipped: list[Unfetched] = field(default_factory=list)
    failed: list[Unfetched] = field(default_factory=list)
    bytes: int = 0
    entries: int = 0


def fetch_user(
    gmail: GmailUser,
    cursor: JsonDict | None,
    context: FetchContext,
    *,
    in_flight: int,
    token_refusal: TokenRefusal,
) -> Iterator[Batch]:
    """Yield the user's batches after `cursor` (see the module docstring)."""
    return _Run(gmail, context, in_flight, token_refusal).batches(read_cursor(cursor))


class _Run:
    def __init__(
        self, gmail: GmailUser, context: FetchContext, in_flight: int, token_refusal: TokenRefusal
    ) -> None:
        self.gmail = gmail
        self.context = context
        self.in_flight = in_flight
        self.token_refusal = token_refusal
        self.pending = _Pending()
        self.changed = False
        self.failures_in_row = 0
        # Ids handed over in this run: a listing that shifts under us, or a failed id
        # seen again, is never handed over twice.
        self.handled: set[str] = set()
        self.state = State("", None)
        self.labels: LabelNames | None = None

    def batches(self, state: State | None) -> Iterator[Batch]:
        try:
            # The first calls are made alone: they fetch the user's token once for
            # every thread, and a user who cannot be read is known before anything else.
            if state is None:
                profile = self._mailbox_call("getProfile", self.gmail.profile)
                state = State(str(profile["historyId"]), Listing(None))
                self.changed = True
            self.state = state
            self.labels = LabelNames(lambda: self._mailbox_call("labels.list", self.gmail.labels))
            if self.state.failed:
                yield from self._retry_failed()
            if self.state.listing is None:
                yield from self._sync()
            if self.state.listing is not None:
                yield from self._list(self.state.listing)
        except Exception:
            if self._has_pending():
                yield self._take()
            raise
        if self._has_pending() or self.changed:
            yield self._take()

    # --- the three phases ---------------------------------------------------------

    def _retry_failed(self) -> Iterator[Batch]:
        ids = list(self.state.failed)
        logger.info("Gmail %s: fetching %d messages that failed before", self.gmail.email, len(ids))
        yield from self._hand_over_all(_Item(i, retry=True) for i in ids)

    def _list(self, listing: Listing) -> Iterator[Batch]:
        restarted = False

        def list_page(token: str | None) -> JsonDict:
            try:
                return self.gmail.list_page(token)
            except ApiRefused as exc:
                if exc.status == 400 and token is not None and not restarted:
                    raise _StalePageToken from None
                raise

        def items() -> Iterator[_Item]:
            nonlocal restarted
            token, done = listing.page_token, set(listing.done)
            while True:
                try:
                    page = self._mailbox_call("messages.list", partial(list_page, token))
                except _StalePageToken:
                    # A cursor's page token from long ago: list from the start again;
                    # the archive says what is there, so nothing is downloaded twice.
                    logger.warning(
                        "Gmail %s: the listing's page token is no longer accepted: "
                        "listing from the first page again",
                        self.gmail.email,
                    )
                    token, done, restarted = None, set(), True
                    continue
                ids = [str(m["id"]) for m in page.get("messages") or () if m.get("id")]
                todo = [i for i in ids if i not in done and i not in self.handled]
                archived = self._archived(todo)
                wanted = set(todo) - archived
                for message_id in ids:
                    if message_id in done:
                        continue
                    if message_id in archived:
                        # Reported as known, so that the run counts it as already
                        # present; a listing carries no labels, so no folder path
                        # is merged (a sync's history does report label changes).
                        yield _Item(
                            message_id, False, listed=True, page_token=token, known_paths=()
                        )
                    else:
                        fetch = message_id in wanted
                        yield _Item(message_id, fetch, listed=True, page_token=token)
                token, done = page.get("nextPageToken"), set()
                if not token:
                    return

        yield from self._hand_over_all(items())
        self.state.listing = None
        self.changed = True

    def _sync(self) -> Iterator[Batch]:
        start = self.state.history_id
        changes: dict[str, _Change] = {}
        next_start: str | None = None
        token: str | None = None
        while True:
            try:
                page = self._mailbox_call(
                    "history.list", partial(self.gmail.history_page, start, token)
                )
            except _HistoryExpired:
                logger.warning(
                    "Gmail %s: history from %s has expired: listing the mailbox again "
                    "(only messages not archived yet are downloaded)",
                    self.gmail.email,
                    start,
                )
                profile = self._mailbox_call("getProfile", self.gmail.profile)
                self.state.history_id = str(profile["historyId"])
                self.state.listing = Listing(None)
                self.changed = True
                return
            if next_start is None:
                next_start = str(page.get("historyId") or start)
            _collect(page, changes)
            token = page.get("nextPageToken")
            if not token:
                break
        candidates = [
            (message_id, change)
            for message_id, change in changes.items()
            if message_id not in self.handled and not self._excluded(change.label_ids)
        ]
        archived = self._archived([message_id for message_id, _ in candidates])
        assert self.labels is not None
        items = []
        for message_id, change in candidates:
            if message_id not in archived:
                items.append(_Item(message_id))
            elif change.folder_added:
                paths = self.labels.paths(change.label_ids)
                items.append(_Item(message_id, fetch=False, known_paths=paths))
        yield from self._hand_over_all(items)
        if next_start != self.state.history_id:
            self.state.history_id = next_start
            self.changed = True

    # --- fetching and handing over ------------------------------------------------

    def _hand_over_all(self, items: Iterator[_Item] | Sequence[_Item]) -> Iterator[Batch]:
        results = fetch_in_order(
            self._fetch,
            items,
            # Twice as many fetches under way as requests may be in flight (the
            # client lets `in_flight` of them call Gmail at once): while the message
            # first in order is slow, the next ones keep the requests going.
            max_in_flight=self.in_flight * FETCH_WINDOW,
            size_of=lambda r: len(r.raw) if isinstance(r, _Got) else 0,
            max_bytes_waiting=MAX_BYTES_WAITING,
            name="gmail",
        )
        for item, result in results:
            self._hand_over(item, result)
            if self._batch_full():
                yield self._take()

    def _fetch(self, item: _Item) -> _Got | _Missed | None:
        if not item.fetch:
            return None
        try:
            answer = self.gmail.get(item.id)
        except TokenRefused as exc:
            raise self.token_refusal(exc, self.gmail.email) from None
        except ApiRefused as exc:
            if exc.status == 401:
                raise _unauthorized(self.gmail.email, exc) from None
            return _Missed(f"Gmail answered {exc}", gone=exc.status == 404)
        except RetryLater as exc:
            return _Missed(f"Gmail kept failing: {exc.reason}", gone=False)
        try:
            raw = decode_raw(str(answer["raw"]))
        except (KeyError, ValueError):
            return _Missed("Gmail sent no raw message, or one that is not base64url", gone=False)
        return _Got(raw, tuple(str(label) for label in answer.get("labelIds") or ()))

    def _hand_over(self, item: _Item, result: _Got | _Missed | None) -> None:
        fresh = result is not None and item.id not in self.handled
        message = None
        if fresh and isinstance(result, _Got) and not self._excluded(result.label_ids):
            # First what may fail (naming a new label lists the labels again), so
            # that a failure leaves the cursor before this item.
            assert self.labels is not None
            paths = self.labels.paths(result.label_ids)
            message = FetchedMessage(result.raw, paths, item.id)
        self.changed = True
        self.pending.entries += 1
        listing = self.state.listing
        if item.listed and listing is not None:
            if listing.page_token != item.page_token:
                listing.page_token, listing.done = item.page_token, []
            listing.done.append(item.id)
        if item.known_paths is not None:
            self.pending.known.append(KnownMessage(item.id, item.known_paths))
            return
        if not fresh:
            return
        self.handled.add(item.id)
        if item.id in self.state.failed:
            self.state.failed.remove(item.id)
        if isinstance(result, _Missed):
            self._missed(item, result)
            return
        self.failures_in_row = 0
        if message is None:
            logger.debug("Gmail %s: %s is in Spam or Trash now", self.gmail.email, item.id)
            return
        self.pending.messages.append(message)
        self.pending.bytes += len(message.raw)

    def _missed(self, item: _Item, missed: _Missed) -> None:
        unfetched = Unfetched(item.id, missed.reason)
        if missed.gone:
            self.failures_in_row = 0  # Gmail answered: it is the message that is gone
            self.pending.skipped.append(unfetched)
            return
        logger.warning("Gmail %s: message %s failed: %s", self.gmail.email, item.id, missed.reason)
        self.pending.failed.append(unfetched)
        self.state.failed.append(item.id)
        if item.retry:
            return
        self.failures_in_row += 1
        if self.failures_in_row >= MAX_FAILURES_IN_A_ROW:
            raise ProviderUnavailable(
                f"Gmail failed {self.failures_in_row} messages in a row for {self.gmail.email} "
                f"(last: {missed.reason}); they are fetched again on the next run"
            )

    def _batch_full(self) -> bool:
        return (
            len(self.pending.messages) >= BATCH_MESSAGES
            or self.pending.bytes >= BATCH_BYTES
            or self.pending.entries >= BATCH_ENTRIES
        )

    def _has_pending(self) -> bool:
        return self.pending.entries > 0

    def _take(self) -> Batch:
        pending, self.pending = self.pending, _Pending()
        self.changed = False
        return Batch(
            pending.messages,
            cursor_json(self.state),
            known=pending.known,
            skipped=pending.skipped,
            failed=pending.failed,
        )

    # --- helpers ----------------------------------------------------------------

    def _archived(self, ids: Collection[str]) -> set[str]:
        ordered = list(ids)
        archived: set[str] = set()
        for start in range(0, len(ordered), LOOKUP_CHUNK):
            archived |= self.context.archive.archived_ids(ordered[start : start + LOOKUP_CHUNK])
        return archived

    def _excluded(self, label_ids: Collection[str]) -> bool:
        return not self.gmail.include_spam_trash and not SPAM_AND_TRASH.isdisjoint(label_ids)

    def _mailbox_call(self, what: str, call: Callable[[], JsonDict]) -> JsonDict:
        """A call about the whole mailbox: its refusals are the mailbox's fate."""
        email = self.gmail.email
        try:
            return call()
        except TokenRefused as exc:
            raise self.token_refusal(exc, email) from None
        except ApiRefused as exc:
            if exc.status == 404 and what == "history.list":
                raise _HistoryExpired from None
            if exc.status == 401:
                raise _unauthorized(email, exc) from None
            if exc.status == 400 and exc.reason == "failedPrecondition":
                raise MailboxUnavailable(
                    f"Gmail is not enabled for {email} ({exc.reason}: {exc.message})"
                ) from None
            raise MailboxUnavailable(f"Gmail refused {what} for {email}: {exc}") from None
        except RetryLater as exc:
            raise ProviderUnavailable(
                f"Gmail kept failing {what} for {email}: {exc.reason}"
            ) from None


class _StalePageToken(Exception):
    """messages.list refused the cursor's page token (400)."""


class _HistoryExpired(Exception):
    """history.list answered 404: the start id is older than Gmail keeps."""


def _collect(page: JsonDict, changes: dict[str, _Change]) -> None:
    """Fold one history page into the latest labels of each message it mentions."""
    for record in page.get("history") or ():
        for kind in ("messagesAdded", "labelsAdded", "labelsRemoved"):
            for entry in record.get(kind) or ():
                message: dict[str, Any] = entry.get("message") or {}
                message_id = message.get("id")
                if not message_id:
                    continue
                change = changes.setdefault(str(message_id), _Change())
                change.label_ids = tuple(str(label) for label in message.get("labelIds") or ())
                if kind == "labelsAdded" and any(
                    is_folder_label(str(label)) for label in entry.get("labelIds") or ()
                ):
                    change.folder_added = True


def _unauthorized(email: str, exc: ApiRefused) -> ProviderAuthError:
    return ProviderAuthError(
        f"Gmail refused the token for {email} even after a new one was issued ({exc}); "
        "check the service account's domain-wide delegation"
    )
