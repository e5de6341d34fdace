"""pst_import: an Outlook PST or OST file, read with libpff (shared rules: `files.py`).

Every folder is walked depth-first in the file's own order (search folders, which
only point at messages stored elsewhere, are skipped). Folder paths are relative to
the top of the personal folders ("Top of Personal Folders" / "Top of Information
Store"), like `lokay-m/MLOKAY (Non-Privileged)/Personal`; folders outside it keep
their full path. Each item is rebuilt as an RFC 822 message, deterministically (see
`build_pst_message`), so a second import produces identical bytes. The id of a
message is its folder path, "/", and its descriptor identifier. Items libpff
recovers outside the folder tree (orphans) are not imported. An attachment
libpff-python cannot give the content of (an attached Outlook item, a link to a
file) is replaced by a short text part that says so (header
`X-Ingestion-Unextracted`) and a warning is logged: the message is archived, the
gap is visible. A damaged or truncated file is a ProviderDataError, raised where
libpff fails.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ingestion_grpc.errors import InvalidArgument, ProviderDataError
from ingestion_grpc.providers.base import FetchedMessage, JsonDict
from ingestion_grpc.providers.files import (
    FileImport,
    SourcePath,
    check_size,
    cursor_int,
    read_head,
    require_regular_file,
)
from ingestion_grpc.providers.pst_mime import build_pst_message, prop_bytes

logger = logging.getLogger(__name__)

PST_MAGIC = b"!BDN"
PR_IPM_SUBTREE_ENTRYID = 0x35E0  # of the message store: "Top of Personal Folders"
NID_TYPE_SEARCH_FOLDER = 0x03


class PstImport(FileImport):
    """An Outlook PST (or OST) file."""

    name = "pst_import"
    file_format = "PST"

    def check_format(self, source: SourcePath) -> None:
        require_regular_file(source)
        head = read_head(source, 512)
        if head[:4] != PST_MAGIC:
            raise InvalidArgument(source.field, "is not a PST or OST file")
        declared = _pst_declared_size(head)
        actual = source.path.stat().st_size
        if declared is not None and declared > actual:
            raise InvalidArgument(
                source.field,
                f"is a truncated PST file: its header says {declared} bytes, the file has {actual}",
            )

    def read(
        self, source: SourcePath, cursor: JsonDict | None
    ) -> Iterator[tuple[FetchedMessage, JsonDict]]:
        return read_pst(source, cursor)


def _pst_declared_size(head: bytes) -> int | None:
    """The file size recorded in a PST/OST header (ibFileEof), if the version is known."""
    if len(head) < 0xC0:
        return None
    (version,) = struct.unpack_from("<H", head, 10)
    if version in (14, 15):  # ANSI
        return int(struct.unpack_from("<I", head, 0xA8)[0])
    if version >= 23:  # Unicode (23), 4K-page OST (36)
        return int(struct.unpack_from("<Q", head, 0xB8)[0])
    return None


def _pst_error(what: str, exc: BaseException) -> ProviderDataError:
    detail = " ".join(str(exc).split())
    if len(detail) > 300:
        detail = detail[:300] + "..."
    return ProviderDataError(f"pst_import: {what}: the PST file is damaged or truncated ({detail})")


def _open_pst(path: Path) -> Any:
    import pypff  # libpff-python: a C extension, imported only when needed

    pst = pypff.file()
    try:
        pst.open(str(path))
    except (OSError, RuntimeError, ValueError, MemoryError) as exc:
        raise _pst_error("the file cannot be opened", exc) from None
    return pst


def read_pst(
    source: SourcePath, cursor: JsonDict | None
) -> Iterator[tuple[FetchedMessage, JsonDict]]:
    size = source.path.stat().st_size
    check_size(cursor, size, "pst_import")
    skip = cursor_int(cursor, "count") if cursor else 0
    last = (cursor or {}).get("last")
    pst = _open_pst(source.path)
    try:
        count = 0
        for folder_path, folder in _pst_folders(pst):
            try:
                total = int(folder.number_of_sub_messages)
            except (OSError, RuntimeError, ValueError) as exc:
                raise _pst_error(f"folder {folder_path!r} cannot be read", exc) from None
            first = min(skip - count, total) if skip > count else 0
            count += first
            if first and count == skip and _pst_message_id(folder, folder_path, first - 1) != last:
                raise ProviderDataError(
                    "pst_import: the file changed since the import started (message "
                    f"{skip} is no longer {last!r}); start a new import"
                )
            for index in range(first, total):
                try:
                    message = folder.get_sub_message(index)
                    message_id = f"{folder_path}/{message.identifier}"
                    raw = build_pst_message(message)
                except ProviderDataError:
                    raise
                except (OSError, RuntimeError, ValueError, MemoryError) as exc:
                    raise _pst_error(
                        f"message {index + 1} of folder {folder_path!r} cannot be read", exc
                    ) from None
                count += 1
                yield (
                    FetchedMessage(raw, (folder_path,), message_id),
                    {"count": count, "last": message_id, "size": size},
                )
        if skip > count:
            raise ProviderDataError(
                f"pst_import: the file changed since the import started (it has {count} "
                f"messages, {skip} were already imported); start a new import"
            )
    finally:
        with contextlib.suppress(Exception):
            pst.close()


def _pst_message_id(folder: Any, folder_path: str, index: int) -> str:
    try:
        return f"{folder_path}/{folder.get_sub_message(index).identifier}"
    except (OSError, RuntimeError, ValueError) as exc:
        raise _pst_error(f"folder {folder_path!r} cannot be read", exc) from None


def _pst_folders(pst: Any) -> Iterator[tuple[str, Any]]:
    """(folder path, folder) for every folder, depth first, in the file's order."""
    try:
        root = pst.get_root_folder()
        ipm = _ipm_subtree_id(pst)
    except (OSError, RuntimeError, ValueError) as exc:
        raise _pst_error("the folder tree cannot be read", exc) from None
    # (folder, its path parts, the path parts its sub-folders extend)
    stack: list[tuple[Any, list[str], list[str]]] = [(root, [], [])]
    while stack:
        folder, parts, child_base = stack.pop()
        path = "/".join(parts)
        try:
            identifier = int(folder.identifier)
            count = int(folder.number_of_sub_folders)
            children = [folder.get_sub_folder(i) for i in range(count)]
        except (OSError, RuntimeError, ValueError) as exc:
            raise _pst_error(f"folder {path!r} cannot be read", exc) from None
        if identifier & 0x1F == NID_TYPE_SEARCH_FOLDER:
            logger.info("pst_import: skipped search folder %r (it holds no messages)", path)
            continue
        yield path, folder
        pushed = []
        for child in children:
            try:
                name = str(child.name or "").replace("\0", "")
            except (OSError, RuntimeError, ValueError) as exc:
                raise _pst_error(f"a sub-folder of {path!r} cannot be read", exc) from None
            child_parts = [*child_base, name]
            # Below the top of the personal folders, paths start again from the top.
            grandchild_base = [] if int(child.identifier) == ipm else child_parts
            pushed.append((child, child_parts, grandchild_base))
        stack.extend(reversed(pushed))


def _ipm_subtree_id(pst: Any) -> int | None:
    """The descriptor id of "Top of Personal Folders" (from the message store)."""
    try:
        store = pst.get_message_store()
    except (OSError, RuntimeError, ValueError):
        return None
    entry_id = prop_bytes(store, PR_IPM_SUBTREE_ENTRYID)
    if entry_id is None or len(entry_id) < 24:
        return None
    return int(struct.unpack_from("<I", entry_id, 20)[0])
