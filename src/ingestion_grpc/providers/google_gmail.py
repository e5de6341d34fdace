"""The Gmail calls an archive makes, as one impersonated user, and the cursor a
fetch keeps (the fetch itself: `google_fetch`).

Cursor (JSON):

    {"historyId": "4711",          # where the next sync starts
     "listing": {"pageToken": "…" or null, "done": ["id", …]},   # while listing
     "failed": ["id", …]}          # fetched again first on every later run

`listing.pageToken` is the token that lists the current page (null: the first)
and `done` the ids of that page already handed over, so a worker killed on page
40 resumes on page 40 with nothing fetched twice.
"""

from __future__ import annotations

import binascii
import logging
from dataclasses import dataclass, field

from ingestion_grpc.providers.base import JsonDict
from ingestion_grpc.providers.google_api import (
    COST_GET,
    COST_HISTORY,
    COST_LABELS,
    COST_LIST,
    COST_PROFILE,
    Client,
)

logger = logging.getLogger(__name__)

PAGE_SIZE = 500
HISTORY_PAGE_SIZE = 500
GET_FIELDS = "id,labelIds,raw"
HISTORY_TYPES = ["messageAdded", "labelAdded", "labelRemoved"]
HISTORY_FIELDS = "history(messagesAdded,labelsAdded,labelsRemoved),nextPageToken,historyId"


@dataclass
class Listing:
    page_token: str | None
    done: list[str] = field(default_factory=list)


@dataclass
class State:
    history_id: str
    listing: Listing | None
    failed: list[str] = field(default_factory=list)


def read_cursor(cursor: JsonDict | None) -> State | None:
    """The cursor's state; None (a fresh import) when there is none or it is not ours."""
    if not cursor:
        return None
    try:
        history_id = str(cursor["historyId"])
        failed = [str(i) for i in cursor.get("failed") or ()]
        listing = cursor.get("listing")
        state = State(history_id, None, failed)
        if listing is not None:
            token = listing.get("pageToken")
            state.listing = Listing(
                None if token is None else str(token), [str(i) for i in listing.get("done") or ()]
            )
    except (KeyError, TypeError, AttributeError):
        logger.warning("Gmail cursor %r is not one this provider wrote: importing again", cursor)
        return None
    return state


def cursor_json(state: State) -> JsonDict:
    cursor: JsonDict = {"historyId": state.history_id, "failed": list(state.failed)}
    if state.listing is not None:
        cursor["listing"] = {
            "pageToken": state.listing.page_token,
            "done": list(state.listing.done),
        }
    return cursor


class GmailUser:
    """The Gmail calls the fetch makes, as one impersonated user."""

    def __init__(self, client: Client, email: str, *, include_spam_trash: bool) -> None:
        self.client = client
        self.email = email
        self.include_spam_trash = include_spam_trash
        # googleapiclient builds a resource's whole method table on every
        # `service.users()` (about 1 ms: the discovery document walked again), so
        # the resources are built once. They only make requests, which each call
        # executes over its own thread's transport: sharing them is safe.
        users = client.service.users()
        self._users = users
        self._labels = users.labels()
        self._messages = users.messages()
        self._history = users.history()

    def profile(self) -> JsonDict:
        return self.client.call(
            lambda _: self._users.getProfile(userId="me", fields="emailAddress,historyId"),
            cost=COST_PROFILE,
        )

    def labels(self) -> JsonDict:
        return self.client.call(
            lambda _: self._labels.list(userId="me", fields="labels(id,name,type)"),
            cost=COST_LABELS,
        )

    def list_page(self, page_token: str | None) -> JsonDict:
        return self.client.call(
            lambda _: self._messages.list(
                userId="me",
                maxResults=PAGE_SIZE,
                pageToken=page_token,
                includeSpamTrash=self.include_spam_trash,
                fields="messages(id),nextPageToken",
            ),
            cost=COST_LIST,
        )

    def get(self, message_id: str) -> JsonDict:
        return self.client.call(
            lambda _: self._messages.get(
                userId="me", id=message_id, format="raw", fields=GET_FIELDS
            ),
            cost=COST_GET,
        )

    def history_page(self, start: str, page_token: str | None) -> JsonDict:
        return self.client.call(
            lambda _: self._history.list(
                userId="me",
                startHistoryId=start,
                pageToken=page_token,
                maxResults=HISTORY_PAGE_SIZE,
                historyTypes=HISTORY_TYPES,
                fields=HISTORY_FIELDS,
            ),
            cost=COST_HISTORY,
        )


def decode_raw(raw: str) -> bytes:
    """base64url, padded or not, strictly: a corrupt body is an error, never other bytes."""
    text = raw.translate(_URLSAFE) + "=" * (-len(raw) % 4)
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error as exc:
        raise ValueError("not base64url") from exc


_URLSAFE = str.maketrans("-_", "+/")
