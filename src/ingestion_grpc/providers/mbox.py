"""mbox_import: one mbox file, read as a stream (the shared rules are in `files.py`).

The file is split at every line that starts with `From ` (mboxo / mboxrd: a quoted
`>From ` body line is kept as is). Each message is exactly what CPython's
`mailbox.mbox(path).get_bytes(key)` returns: the `From ` line is dropped, and one
`\\n` is dropped before the next `From ` line (or the end of the file) when it
stands on a line of its own. The id of a message is the byte offset of its `From `
line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import IO

from ingestion_grpc.errors import InvalidArgument, ProviderDataError
from ingestion_grpc.providers.base import FetchedMessage, JsonDict
from ingestion_grpc.providers.files import (
    MAX_MESSAGE_BYTES,
    FileImport,
    SourcePath,
    base_name,
    check_size,
    cursor_int,
    read_head,
    require_regular_file,
)

# How much of an mbox file is read at a time.
READ_CHUNK_BYTES = 1024 * 1024


class MboxImport(FileImport):
    """An mbox file: many messages, each starting with a `From ` line."""

    name = "mbox_import"
    file_format = "mbox"

    max_message_bytes: int = MAX_MESSAGE_BYTES
    chunk_bytes: int = READ_CHUNK_BYTES

    def check_format(self, source: SourcePath) -> None:
        require_regular_file(source)
        read_head(source, 1)
        with open(source.path, "rb") as handle:
            try:
                _first_from_line(handle, self.chunk_bytes)
            except _NotMbox:
                raise InvalidArgument(
                    source.field,
                    "is not an mbox file: its first line that is not blank does not "
                    "start with 'From '",
                ) from None

    def read(
        self, source: SourcePath, cursor: JsonDict | None
    ) -> Iterator[tuple[FetchedMessage, JsonDict]]:
        folder = base_name(source)  # the mailbox's name
        with open(source.path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            check_size(cursor, size, "mbox_import")
            count = cursor_int(cursor, "count") if cursor else 0
            for offset, raw, following in iter_mbox(
                handle,
                cursor_int(cursor, "offset") if cursor else None,
                chunk_bytes=self.chunk_bytes,
                max_message_bytes=self.max_message_bytes,
            ):
                count += 1
                after = {"offset": following, "count": count, "size": size}
                yield FetchedMessage(raw, (folder,), str(offset)), after


class _NotMbox(Exception):
    """The file has text before its first `From ` line."""


def _first_from_line(handle: IO[bytes], chunk_bytes: int) -> int | None:
    """Offset of the first `From ` line, None for an empty (or all blank) file.

    Raises _NotMbox when a line that is not blank comes first. (CPython's mailbox
    module silently ignores such text; an archive must not.)
    """
    handle.seek(0)
    mid_line = False  # the previous piece was a long blank line cut at chunk_bytes
    while True:
        offset = handle.tell()
        piece = handle.readline(max(chunk_bytes, 8))
        if not piece:
            return None
        if not mid_line and piece.startswith(b"From "):
            return offset
        if piece.strip():
            raise _NotMbox
        mid_line = not piece.endswith(b"\n")


def iter_mbox(
    handle: IO[bytes],
    offset: int | None,
    *,
    chunk_bytes: int = READ_CHUNK_BYTES,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> Iterator[tuple[int, bytes, int]]:
    """(offset of the From line, message bytes, offset of the next From line or EOF).

    Starts at the first message (offset None) or at `offset`, which must be the
    offset of a `From ` line or the end of the file (as returned earlier). Reads
    `chunk_bytes` at a time and holds at most one message plus one chunk.
    """
    if offset is None:
        try:
            first = _first_from_line(handle, chunk_bytes)
        except _NotMbox:
            raise ProviderDataError(
                "mbox_import: the file is not an mbox file (text before the first 'From ' line)"
            ) from None
        if first is None:
            return
        offset = first
    size = os.fstat(handle.fileno()).st_size
    if offset == size:
        return
    if offset > 0:
        handle.seek(offset - 1)
        if handle.read(6) != b"\nFrom ":
            raise ProviderDataError(
                f"mbox_import: the saved position {offset} is not the start of a message; "
                "the file changed since the import started"
            )
    handle.seek(offset)
    # A bytearray: appending is amortised O(chunk) and deleting a prefix is cheap, so
    # a message of any size costs linear time.
    buffer = bytearray(handle.read(chunk_bytes))
    if not buffer.startswith(b"From "):
        raise ProviderDataError(f"mbox_import: no message starts at offset {offset}")
    base = offset  # file offset of buffer[0]
    start = 0  # index in buffer of the current message's From line
    search = 0  # where to look for the next "\nFrom "
    eof = False
    while True:
        found = buffer.find(b"\nFrom ", search)
        if found == -1 and not eof:
            if len(buffer) - start > max_message_bytes:
                raise ProviderDataError(
                    f"mbox_import: the message at offset {base + start} is larger than "
                    f"the limit of {max_message_bytes} bytes"
                )
            chunk = handle.read(chunk_bytes)
            if not chunk:
                eof = True
                continue
            search = max(start, len(buffer) - 5) - start
            del buffer[:start]
            base += start
            start = 0
            buffer += chunk
            continue
        end = len(buffer) if found == -1 else found + 1
        yield base + start, _mbox_message(buffer, start, end, found == -1), base + end
        if found == -1:
            return
        start = search = end


def _mbox_message(buffer: bytearray, start: int, end: int, at_eof: bool) -> bytes:
    """What `mailbox.mbox.get_bytes` returns for the message in buffer[start:end].

    buffer[start:] begins with the `From ` line, which is dropped. A message ends
    before the next `From ` line (or EOF), minus one `\\n` when the last line is
    exactly `\\n` (so a blank line `\\r\\n` of a CRLF file stays, as in CPython).
    """
    newline = buffer.find(b"\n", start, end)
    if newline == -1:  # a `From ` line that ends the file
        return b""
    stop = end
    if at_eof:
        if end - start >= 2 and buffer[end - 1] == 0x0A and buffer[end - 2] == 0x0A:
            stop = end - 1
    elif buffer[end - 2] == 0x0A:  # buffer[end - 1] is the newline before `From `
        stop = end - 1
    with memoryview(buffer) as view:
        return bytes(view[newline + 1 : max(stop, newline + 1)])
