"""Folders and the sync cursor of a generic IMAP account.

A folder has three names:

- `wire`: the name exactly as the server sent it in LIST (7-bit, IMAP modified
  UTF-7), which is what SELECT gets back: no decode/encode round trip can change it;
- `name`: the decoded name with the server's own delimiter, unique on the server;
  it keys the folder's entry in the cursor;
- `path`: the decoded name with the delimiter shown as "/" (the folder path of every
  message, and what `includeFolders` / `excludeFolders` match).

The cursor is plain JSON::

    {"folders": {"INBOX": {"uidvalidity": 1700000000, "lastUid": 456}, ...}}

`lastUid` is the highest UID of the folder whose message was handed out (or found
deleted) under that `uidvalidity`. A folder missing from the cursor, or whose
UIDVALIDITY changed, is read from its first message.
"""

from __future__ import annotations

import binascii
import fnmatch
import itertools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from imapclient import imap_utf7

from ingestion_grpc.errors import ProviderDataError
from ingestion_grpc.providers.base import JsonDict

logger = logging.getLogger(__name__)

# LIST attributes of names that exist only as a level of the hierarchy.
UNSELECTABLE = frozenset({b"\\noselect", b"\\nonexistent"})
MAX_UID = 2**32 - 1


@dataclass(frozen=True, order=True)
class Folder:
    """One selectable folder; sorts by `path`, then by the server's spelling."""

    path: str
    name: str
    # None when the server sent 8-bit bytes (not modified UTF-7): no SELECT can name it.
    wire: str | None


@dataclass(frozen=True)
class FolderState:
    """A folder's entry in the cursor."""

    uidvalidity: int
    last_uid: int


def parse_listing(rows: Iterable[tuple[Any, Any, Any]]) -> list[Folder]:
    """Selectable folders from IMAPClient's `list_folders()` rows (with `folder_encode`
    off, so names arrive as the raw bytes), sorted by path."""
    folders: dict[str, Folder] = {}
    for flags, delimiter, raw in rows:
        if {_lower_bytes(flag) for flag in flags or ()} & UNSELECTABLE:
            continue
        folder = folder_from_wire(raw, delimiter)
        other = folders.setdefault(folder.name, folder)
        if other != folder:
            # Only a server that breaks modified UTF-7 can get here; the cursor needs
            # one entry per folder, so say so rather than read one of them.
            raise ProviderDataError(
                f"the IMAP server lists two folders that both read {folder.name!r}: "
                f"{other.wire!r} and {folder.wire!r} (not valid modified UTF-7)"
            )
    listed = sorted(folders.values())
    _warn_on_shared_paths(listed)
    return listed


def folder_from_wire(raw: bytes | str | int, delimiter: bytes | str | None) -> Folder:
    """A Folder for one LIST name; see the module docstring for the three names."""
    data = raw if isinstance(raw, bytes) else str(raw).encode("utf-8")
    if data.isascii():
        wire: str | None = data.decode("ascii")
        name = _decode_modified_utf7(data)
    else:
        wire = None
        name = data.decode("utf-8", errors="backslashreplace")
    sep = delimiter.decode("ascii", "replace") if isinstance(delimiter, bytes) else delimiter
    path = name.replace(sep, "/") if sep and sep != "/" else name
    return Folder(path=path, name=name, wire=wire)


def select_folders(
    folders: Sequence[Folder], include: Sequence[str] | None, exclude: Sequence[str] | None
) -> list[Folder]:
    """`includeFolders` first (when given), then `excludeFolders`: fnmatch globs on the
    path, case-sensitive, where `*` also matches "/" ("Archive/*" takes every level)."""
    chosen = list(folders)
    if include:
        chosen = [f for f in chosen if any(fnmatch.fnmatchcase(f.path, p) for p in include)]
    if exclude:
        chosen = [f for f in chosen if not any(fnmatch.fnmatchcase(f.path, p) for p in exclude)]
    return chosen


def read_cursor(cursor: Mapping[str, Any] | None) -> dict[str, FolderState]:
    """The folders of a cursor. Anything unreadable is dropped with a warning: the
    folder is then read again from its first message (repeats, never gaps)."""
    if not cursor:
        return {}
    entries = cursor.get("folders") if isinstance(cursor, Mapping) else None
    if not isinstance(entries, Mapping):
        logger.warning("IMAP cursor without a folders object: reading every folder again")
        return {}
    state: dict[str, FolderState] = {}
    for name, entry in entries.items():
        uidvalidity = _uint(entry.get("uidvalidity")) if isinstance(entry, Mapping) else None
        last_uid = _uint(entry.get("lastUid")) if isinstance(entry, Mapping) else None
        if not isinstance(name, str) or uidvalidity is None or last_uid is None:
            logger.warning("IMAP cursor entry %r is not valid: reading that folder again", name)
            continue
        state[name] = FolderState(uidvalidity, last_uid)
    return state


def cursor_json(state: Mapping[str, FolderState]) -> JsonDict:
    """A new JSON cursor for `state` (a fresh object: the caller may keep it)."""
    return {
        "folders": {
            name: {"uidvalidity": entry.uidvalidity, "lastUid": entry.last_uid}
            for name, entry in sorted(state.items())
        }
    }


def _decode_modified_utf7(data: bytes) -> str:
    """The decoded name, or the 7-bit text as is when it is not canonical modified
    UTF-7 (then decoding would not be reversible and could merge two names)."""
    text = data.decode("ascii")
    try:
        decoded = imap_utf7.decode(data)
    except (UnicodeError, ValueError, binascii.Error):
        return text
    return decoded if imap_utf7.encode(decoded) == data else text


def _warn_on_shared_paths(folders: Sequence[Folder]) -> None:
    # Two server names share a path only if one holds a "/" while the server's
    # delimiter is another character. Both are read (their cursor entries differ);
    # only their folder paths look the same.
    for before, after in itertools.pairwise(folders):
        if before.path == after.path:
            logger.warning(
                "IMAP folders %r and %r both have the path %r once the server's delimiter "
                "is shown as '/'",
                before.name,
                after.name,
                before.path,
            )


def _lower_bytes(value: bytes | str) -> bytes:
    return (value if isinstance(value, bytes) else value.encode("utf-8")).lower()


def _uint(value: Any) -> int | None:
    """A JSON UID or UIDVALIDITY (numbers may arrive as floats through protobuf)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 0 <= value <= MAX_UID:
        return value
    return None
