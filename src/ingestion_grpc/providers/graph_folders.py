"""Folders and the sync cursor of a Microsoft 365 mailbox.

Folders: `mailFolders` and every folder's `childFolders`, hidden ones included, every
page. A folder's path is its display names joined with "/", as the mailbox shows them
(localised, non-ASCII kept). Every folder's children are asked for, whatever its
`childFolderCount` says: one request per folder per sync is cheap next to a folder
missed.

The cursor, plain JSON keyed by folder id (folder ids survive renames and moves)::

    {"folders": {"<folder id>": {"path": "Inbox/Projects",
                                 "deltaLink": "<verbatim>",      # a finished round
                                 "failed": ["<message id>"]}}}   # optional

Mid-round the entry holds `"nextLink"` (the page to ask next, verbatim) instead of
`deltaLink`, and `"seen"`: ids of that page already handed out, when a batch ended
inside a page. A folder with neither link starts a fresh round. `failed` lists
messages that kept failing: they are fetched again (by id) before any folder's delta
on the next run. `path` is informative: the folder's path when it was last read.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from ingestion_grpc.errors import MailboxUnavailable, ProviderUnavailable
from ingestion_grpc.providers.base import JsonDict
from ingestion_grpc.providers.graph_client import GraphClient, GraphError, MailboxGate
from ingestion_grpc.providers.retries import RetryLater

logger = logging.getLogger(__name__)

FOLDER_PAGE = 100
NO_MAILBOX_CODES = frozenset({"mailboxnotenabledforrestapi", "resourcenotfound"})


@dataclass(frozen=True)
class GraphFolder:
    id: str
    path: str


@dataclass
class FolderState:
    path: str
    delta_link: str | None = None
    next_link: str | None = None
    seen: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def read_cursor(cursor: Mapping[str, Any] | None) -> dict[str, FolderState]:
    """The folders of a cursor; an unreadable entry is dropped with a warning (that
    folder is then listed again: repeats cost a lookup, never a download)."""
    if not cursor:
        return {}
    entries = cursor.get("folders")
    if not isinstance(entries, Mapping):
        logger.warning("Graph cursor without a folders object: listing every folder again")
        return {}
    states: dict[str, FolderState] = {}
    for folder_id, entry in entries.items():
        state = _folder_state(entry)
        if state is None:
            logger.warning(
                "Graph cursor entry of folder %r is not valid: listing it again", folder_id
            )
            continue
        states[str(folder_id)] = state
    return states


def _folder_state(entry: Any) -> FolderState | None:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("path"), str):
        return None
    links = {name: entry.get(name) for name in ("deltaLink", "nextLink")}
    if any(value is not None and not isinstance(value, str) for value in links.values()):
        return None
    lists = {name: entry.get(name) or [] for name in ("seen", "failed")}
    if any(
        not isinstance(v, list) or not all(isinstance(i, str) for i in v) for v in lists.values()
    ):
        return None
    next_link = links["nextLink"]
    return FolderState(
        path=entry["path"],
        delta_link=None if next_link else links["deltaLink"],
        next_link=next_link,
        seen=list(lists["seen"]) if next_link else [],
        failed=list(dict.fromkeys(lists["failed"])),
    )


def cursor_json(states: Mapping[str, FolderState]) -> JsonDict:
    """A fresh JSON cursor for `states` (the caller may keep it)."""
    folders: JsonDict = {}
    for folder_id, state in sorted(states.items()):
        entry: JsonDict = {"path": state.path}
        if state.next_link:
            entry["nextLink"] = state.next_link
            if state.seen:
                entry["seen"] = list(state.seen)
        elif state.delta_link:
            entry["deltaLink"] = state.delta_link
        if state.failed:
            entry["failed"] = list(state.failed)
        folders[folder_id] = entry
    return {"folders": folders}


def list_folders(
    client: GraphClient,
    user_id: str,
    gate: MailboxGate,
    *,
    concurrency: int = 1,
    name: str = "graph",
) -> list[GraphFolder]:
    """Every folder of the mailbox, hidden ones included, sorted by path.

    One level of the tree at a time, up to `concurrency` folders' children asked for
    at once (within the mailbox's limits like any request): a mailbox of 50 folders
    is then listed in a few round trips, not 50 in a row before the first download.
    Raises MailboxUnavailable when the user has no mailbox Graph can read.
    """
    user = quote(user_id, safe="")
    query = f"includeHiddenFolders=true&$top={FOLDER_PAGE}&$select=id,displayName"
    level: list[tuple[str, str]] = [(client.url(f"/users/{user}/mailFolders?{query}"), "")]
    folders: list[GraphFolder] = []

    def children(url: str, parent: str) -> list[GraphFolder]:
        listed: list[GraphFolder] = []
        try:
            for item in client.pages(url, what="listing mail folders", gate=gate):
                folder_id, name = item.get("id"), item.get("displayName")
                if isinstance(folder_id, str) and isinstance(name, str):
                    listed.append(GraphFolder(folder_id, f"{parent}/{name}" if parent else name))
        except GraphError as exc:
            if parent and exc.status == 404 and not no_mailbox(exc):
                logger.info("mail folder %r went away while listing it", parent)
                return []
            raise mailbox_error(exc) from None
        except RetryLater as exc:
            raise ProviderUnavailable(f"Microsoft Graph keeps failing: {exc.reason}") from None
        return listed

    with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix=f"{name}-folders") as pool:
        while level:
            # Each in a copy of this thread's context: log lines and metrics name the
            # mailbox and provider the engine is working for.
            jobs = [
                pool.submit(contextvars.copy_context().run, children, url, parent)
                for url, parent in level
            ]
            found = [folder for job in jobs for folder in job.result()]
            folders += found
            level = [
                (
                    client.url(
                        f"/users/{user}/mailFolders/{quote(f.id, safe='')}/childFolders?{query}"
                    ),
                    f.path,
                )
                for f in found
            ]
    return sorted(folders, key=lambda f: (f.path, f.id))


def mailbox_error(exc: GraphError) -> Exception:
    """What a mailbox-level Graph refusal means for the run."""
    if exc.status == 404 and no_mailbox(exc):
        return MailboxUnavailable(
            f"no Exchange Online mailbox that Graph can read (404 {exc.code}): the user "
            "is unlicensed, a guest, or hosted on-premises"
        )
    if exc.status == 403:
        return MailboxUnavailable(
            f"Microsoft Graph denied access to this mailbox (403 {exc.code}): the app needs "
            "the application permission Mail.Read with admin consent, and the tenant's "
            "application access policy, if it has one, must include this mailbox"
        )
    return ProviderUnavailable(str(exc))


def no_mailbox(exc: GraphError) -> bool:
    return exc.code.casefold() in NO_MAILBOX_CODES
