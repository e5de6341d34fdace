"""File imports: one PST, EML or mbox source, from a path on this server or an upload.

The three providers share one config (`localFilePath` or `uploadedFilePath`) and
differ in the file format they read. Every one of them:

* accepts only paths inside its root: `localFilePath` inside IMPORT_ROOT (a
  relative path is relative to it), `uploadedFilePath` inside UPLOAD_ROOT, both
  checked after resolving symbolic links (`file_roots` reads the roots);
* streams: memory stays bounded by one batch plus the largest message, whatever
  the size of the file;
* yields batches in a deterministic order whose cursor (a small JSON object)
  resumes exactly after the batch, in another process, after a crash. A cursor
  also records the size of the file (or, for a folder, the name of the last
  entry read), so a file that changed under a running import stops it with
  ProviderDataError instead of skipping or repeating messages;
* is imported once, never synced (`continuous_sync = False`).

Formats:

* mbox (`mbox_import`): split at every line that starts with `From ` (mboxo /
  mboxrd: a quoted `>From ` body line is kept as is). Each message is exactly
  what CPython's `mailbox.mbox(path).get_bytes(key)` returns: the `From ` line is
  dropped, and one `\\n` is dropped before the next `From ` line (or the end of
  the file) when it stands on a line of its own. The id of a message is the
  byte offset of its `From ` line.
* EML (`eml_import`): a .zip of .eml files, or a folder walked recursively. The
  bytes archived are the .eml file's bytes. Entries are read in sorted order of
  their names; the folder part of a name becomes the folder path (`Archive/2002`;
  "" for the top level). Other entries (not ending in .eml, empty files,
  `__MACOSX/` metadata, names that climb out of the archive such as
  `../evil.eml` or `/etc/x.eml`, symbolic links leading out of the root, special
  files) are skipped, logged and counted in `skipped`: nothing is extracted to
  disk, so such names are harmless, but they are not imported. A zip entry over
  `max_entry_bytes` uncompressed, or compressed more than `max_ratio`:1 (for
  entries over `ratio_min_bytes`), stops the import with ProviderDataError: it
  is a zip bomb, or a message too large to archive.
* PST / OST (`pst_import`, read with libpff): every folder is walked depth-first
  in the file's own order (search folders, which only point at messages stored
  elsewhere, are skipped). Folder paths are relative to the top of the personal
  folders ("Top of Personal Folders" / "Top of Information Store"), like
  `lokay-m/MLOKAY (Non-Privileged)/Personal`; folders outside it keep their full
  path. Each item is rebuilt as an RFC 822 message, deterministically (see
  `build_pst_message`), so a second import produces identical bytes. The id of
  a message is its folder path, "/", and its descriptor identifier. Items
  libpff recovers outside the folder tree (orphans) are not imported. An
  attachment libpff-python cannot give the content of (an attached Outlook
  item, a link to a file) is replaced by a short text part that says so
  (header `X-Ingestion-Unextracted`) and a warning is logged: the message is
  archived, the gap is visible. A damaged or truncated file is a
  ProviderDataError, raised where libpff fails.

Errors: a bad path or a file of the wrong format is InvalidArgument naming
`providerConfig.localFilePath` (or `uploadedFilePath`); a file found damaged
while reading, or changed since the import started, is ProviderDataError.
"""

from __future__ import annotations

import base64
import contextlib
import email.header
import email.utils
import errno
import hashlib
import logging
import os
import re
import stat
import struct
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any, ClassVar

from ingestion_grpc.errors import InvalidArgument, ProviderDataError
from ingestion_grpc.providers.base import Batch, ConfigField, FetchedMessage, JsonDict, Provider

logger = logging.getLogger(__name__)

LOCAL = "localFilePath"
UPLOADED = "uploadedFilePath"

# Batch bounds: a batch closes at this many messages or before this many raw bytes
# (a single message larger than that travels alone).
MAX_BATCH_MESSAGES = 500
MAX_BATCH_BYTES = 32 * 1024 * 1024
# The largest single message an mbox or EML import holds in memory. A larger one
# stops the import with ProviderDataError (never a silent skip).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Zip-bomb guard: an entry over RATIO_MIN_BYTES uncompressed may not be compressed
# more than MAX_COMPRESSION_RATIO:1.
MAX_COMPRESSION_RATIO = 200
RATIO_MIN_BYTES = 1024 * 1024
# How much of an mbox file is read at a time.
READ_CHUNK_BYTES = 1024 * 1024

PST_MAGIC = b"!BDN"


def file_roots() -> tuple[Path, Path]:
    """(IMPORT_ROOT, UPLOAD_ROOT) as absolute paths (symbolic links not resolved).

    IMPORT_ROOT defaults to `<DATA_DIR>/imports`, UPLOAD_ROOT to
    `<DATA_DIR>/uploads`, DATA_DIR to `./data`. The one place that knows where
    file imports may read; wire it to Settings here.
    """
    data_dir = Path(os.environ.get("DATA_DIR") or "./data")
    import_root = Path(os.environ.get("IMPORT_ROOT") or data_dir / "imports")
    upload_root = Path(os.environ.get("UPLOAD_ROOT") or data_dir / "uploads")
    return Path(os.path.abspath(import_root)), Path(os.path.abspath(upload_root))


# --- the providers --------------------------------------------------------------------


@dataclass(frozen=True)
class SourcePath:
    """A configured path that passed the root checks."""

    field: str  # "providerConfig.localFilePath" or "providerConfig.uploadedFilePath"
    given: str  # the configured value
    path: Path  # resolved, inside `root`
    root: Path  # resolved root


class FileImport(Provider):
    """Base of the file imports: exactly one of `localFilePath` / `uploadedFilePath`."""

    file_format: ClassVar[str]
    continuous_sync = False
    fields = (
        # A path readable by the service on its own machine, inside IMPORT_ROOT.
        ConfigField(LOCAL, str, required=False),
        # The path an earlier upload returned, inside UPLOAD_ROOT.
        ConfigField(UPLOADED, str, required=False),
    )

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        batch_messages: int = MAX_BATCH_MESSAGES,
        batch_bytes: int = MAX_BATCH_BYTES,
    ) -> None:
        super().__init__(config)
        self.batch_messages = batch_messages
        self.batch_bytes = batch_bytes

    @classmethod
    def check_values(cls, config: JsonDict) -> None:
        """Shape only: the filesystem is checked by `check_connection` and `fetch`."""
        given = [name for name in (LOCAL, UPLOADED) if name in config]
        for name in given:
            if not config[name].strip():
                raise InvalidArgument(f"providerConfig.{name}", "must not be empty")
        if not given:
            raise InvalidArgument(
                f"providerConfig.{LOCAL}",
                f"is required: give the {cls.file_format} file as {LOCAL} or {UPLOADED}",
            )
        if len(given) > 1:
            raise InvalidArgument(
                f"providerConfig.{LOCAL}",
                f"give exactly one of {LOCAL} and {UPLOADED}, not both",
            )
        _check_path_text(f"providerConfig.{given[0]}", config[given[0]])

    # -- the Provider interface

    def check_connection(self) -> None:
        """The file exists, is readable and is in this provider's format (by content)."""
        source = self.source()
        self.check_format(source)
        logger.info("%s check passed: %s", self.name, source.given)

    def list_mailboxes(self) -> list[str]:
        """One mailbox: the base name of the file (or folder)."""
        return [_base_name(self.source())]

    def fetch(self, mailbox: str, cursor: JsonDict | None) -> Iterator[Batch]:
        source = self.source()
        expected = self.list_mailboxes()[0]
        if mailbox != expected:
            raise InvalidArgument("mailbox", f"is not a mailbox of this source (it has {expected})")
        self.check_format(source)
        return _batched(
            self.read(source, dict(cursor) if cursor else None),
            self.batch_messages,
            self.batch_bytes,
        )

    # -- for the subclasses

    def source(self) -> SourcePath:
        """The configured path, resolved and checked, or InvalidArgument naming the field."""
        name = LOCAL if LOCAL in self.config else UPLOADED
        import_root, upload_root = file_roots()
        root = import_root if name == LOCAL else upload_root
        label = "IMPORT_ROOT" if name == LOCAL else "UPLOAD_ROOT"
        return resolve_source(f"providerConfig.{name}", str(self.config.get(name, "")), root, label)

    def check_format(self, source: SourcePath) -> None:
        raise NotImplementedError

    def read(
        self, source: SourcePath, cursor: JsonDict | None
    ) -> Iterator[tuple[FetchedMessage, JsonDict]]:
        """Every message after `cursor`, each with the cursor that is true after it."""
        raise NotImplementedError


class PstImport(FileImport):
    """An Outlook PST (or OST) file."""

    name = "pst_import"
    file_format = "PST"

    def check_format(self, source: SourcePath) -> None:
        _require_regular_file(source)
        head = _read_head(source, 512)
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


class EmlImport(FileImport):
    """EML: RFC 5322 messages, one message per file, in a .zip or a folder."""

    name = "eml_import"
    file_format = "EML"

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        max_entry_bytes: int = MAX_MESSAGE_BYTES,
        max_ratio: int = MAX_COMPRESSION_RATIO,
        ratio_min_bytes: int = RATIO_MIN_BYTES,
        **kwargs: int,
    ) -> None:
        super().__init__(config, **kwargs)
        self.max_entry_bytes = max_entry_bytes
        self.max_ratio = max_ratio
        self.ratio_min_bytes = ratio_min_bytes
        # Entries not imported (see the module docstring), counted since the import
        # began (the count travels in the cursor), and the last names skipped.
        self.skipped = 0
        self.skipped_names: list[str] = []

    def check_format(self, source: SourcePath) -> None:
        if source.path.is_dir():
            if not os.access(source.path, os.R_OK | os.X_OK):
                raise InvalidArgument(source.field, "is not readable")
            return
        _require_regular_file(source)
        _read_head(source, 4)
        if not zipfile.is_zipfile(source.path):
            raise InvalidArgument(source.field, "is not a zip file or a folder of .eml files")

    def read(
        self, source: SourcePath, cursor: JsonDict | None
    ) -> Iterator[tuple[FetchedMessage, JsonDict]]:
        if source.path.is_dir():
            return self._read_folder(source, cursor)
        return self._read_zip(source, cursor)

    def _skip(self, name: str, why: str) -> None:
        self.skipped += 1
        self.skipped_names = [*self.skipped_names[-99:], name]
        logger.warning("eml_import: skipped %r: %s", name, why)

    def _start(self, names: list[str], cursor: JsonDict | None) -> int:
        """The index to resume at, after checking that the cursor fits `names`."""
        if cursor is None:
            self.skipped = 0
            return 0
        index = _cursor_int(cursor, "index")
        last = cursor.get("name")
        if index > len(names) or (index > 0 and names[index - 1] != last):
            raise ProviderDataError(
                "eml_import: the source changed since the import started "
                f"(entry {index} is no longer {last!r}); start a new import"
            )
        self.skipped = _cursor_int(cursor, "skipped")
        return index

    # -- zip

    def _read_zip(
        self, source: SourcePath, cursor: JsonDict | None
    ) -> Iterator[tuple[FetchedMessage, JsonDict]]:
        size = source.path.stat().st_size
        _check_size(cursor, size, "eml_import")
        try:
            archive = zipfile.ZipFile(source.path)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
            raise ProviderDataError(f"eml_import: the zip file cannot be read: {exc}") from None
        with archive:
            entries = sorted(archive.infolist(), key=lambda i: (i.filename, i.header_offset))
            names = [info.filename for info in entries]
            ids = _unique_ids(names)
            plan = [_zip_entry_folder(info) for info in entries]
            self._guard_zip(entries, plan)
            for index in range(self._start(names, cursor), len(entries)):
                info, (folder, reason) = entries[index], plan[index]
                if folder is None:
                    if reason:
                        self._skip(info.filename, reason)
                    continue
                raw = self._read_zip_entry(archive, info)
                if not raw:
                    self._skip(info.filename, "empty file")
                    continue
                after = {
                    "index": index + 1,
                    "name": info.filename,
                    "size": size,
                    "skipped": self.skipped,
                }
                yield FetchedMessage(raw, folder, ids[index]), after

    def _guard_zip(
        self, entries: list[zipfile.ZipInfo], plan: list[tuple[str | None, str | None]]
    ) -> None:
        """Refuse the whole archive before importing anything from it."""
        for info, (folder, _) in zip(entries, plan, strict=True):
            if folder is None:
                continue
            if info.flag_bits & 0x1:
                raise ProviderDataError(
                    f"eml_import: zip entry {info.filename!r} is encrypted; "
                    "give an archive without a password"
                )
            if info.file_size > self.max_entry_bytes:
                raise ProviderDataError(
                    f"eml_import: zip entry {info.filename!r} is {info.file_size} bytes "
                    f"uncompressed, more than the limit of {self.max_entry_bytes}"
                )
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size > self.ratio_min_bytes and ratio > self.max_ratio:
                raise ProviderDataError(
                    f"eml_import: zip entry {info.filename!r} expands {ratio:.0f} times "
                    f"(limit {self.max_ratio}:1): it looks like a zip bomb"
                )

    def _read_zip_entry(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
        try:
            with archive.open(info) as handle:
                # zipfile stops at the declared size and checks the CRC at the end.
                raw = handle.read(self.max_entry_bytes + 1)
        except Exception as exc:  # BadZipFile, OSError, EOFError, zlib.error, LZMAError...
            raise ProviderDataError(
                f"eml_import: zip entry {info.filename!r} cannot be read: {exc}"
            ) from None
        if len(raw) > self.max_entry_bytes:
            raise ProviderDataError(
                f"eml_import: zip entry {info.filename!r} is larger than the limit "
                f"of {self.max_entry_bytes} bytes"
            )
        return raw

    # -- folder

    def _read_folder(
        self, source: SourcePath, cursor: JsonDict | None
    ) -> Iterator[tuple[FetchedMessage, JsonDict]]:
        listing = _list_folder(source.path)
        names = [name for name, _ in listing]
        for index in range(self._start(names, cursor), len(listing)):
            name, relative = listing[index]
            raw = self._read_folder_entry(source, name, relative)
            if raw is None:
                continue
            after = {"index": index + 1, "name": name, "skipped": self.skipped}
            yield FetchedMessage(raw, name.rpartition("/")[0], name), after

    def _read_folder_entry(self, source: SourcePath, name: str, relative: str) -> bytes | None:
        """The file's bytes, or None when it is skipped (and counted)."""
        try:
            real = (source.path / relative).resolve(strict=True)
            info = real.stat()
        except (OSError, RuntimeError) as exc:
            raise ProviderDataError(f"eml_import: {name!r} cannot be read: {exc}") from None
        if not real.is_relative_to(source.root):
            self._skip(name, "a symbolic link leading outside the allowed folder")
            return None
        if stat.S_ISDIR(info.st_mode):
            self._skip(name, "a symbolic link to a folder (not followed)")
            return None
        if not name.lower().endswith(".eml"):
            self._skip(name, "not an .eml file")
            return None
        if not stat.S_ISREG(info.st_mode):
            self._skip(name, "not a regular file")
            return None
        if info.st_size > self.max_entry_bytes:
            raise ProviderDataError(
                f"eml_import: {name!r} is {info.st_size} bytes, more than the limit "
                f"of {self.max_entry_bytes}"
            )
        try:
            with open(real, "rb") as handle:
                raw = handle.read(self.max_entry_bytes + 1)
        except OSError as exc:
            raise ProviderDataError(f"eml_import: {name!r} cannot be read: {exc}") from None
        if len(raw) > self.max_entry_bytes:
            raise ProviderDataError(
                f"eml_import: {name!r} is larger than the limit of {self.max_entry_bytes} bytes"
            )
        if not raw:
            self._skip(name, "empty file")
            return None
        return raw


def _zip_entry_folder(info: zipfile.ZipInfo) -> tuple[str | None, str | None]:
    """(folder path, None) for an entry to import, else (None, why it is skipped).

    Folders themselves are neither imported nor counted: (None, None).
    """
    name = info.filename
    if info.is_dir():
        return None, None
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts:
        return None, "its name leads outside the archive"
    if parts[0] == "__MACOSX":
        return None, "macOS metadata"
    if not name.lower().endswith(".eml"):
        return None, "not an .eml file"
    return "/".join(p for p in parts[:-1] if p not in ("", ".")), None


class MboxImport(FileImport):
    """An mbox file: many messages, each starting with a `From ` line."""

    name = "mbox_import"
    file_format = "mbox"

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        chunk_bytes: int = READ_CHUNK_BYTES,
        **kwargs: int,
    ) -> None:
        super().__init__(config, **kwargs)
        self.max_message_bytes = max_message_bytes
        self.chunk_bytes = chunk_bytes

    def check_format(self, source: SourcePath) -> None:
        _require_regular_file(source)
        _read_head(source, 1)
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
        folder = _base_name(source)  # the mailbox's name
        with open(source.path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            _check_size(cursor, size, "mbox_import")
            count = _cursor_int(cursor, "count") if cursor else 0
            for offset, raw, following in iter_mbox(
                handle,
                _cursor_int(cursor, "offset") if cursor else None,
                chunk_bytes=self.chunk_bytes,
                max_message_bytes=self.max_message_bytes,
            ):
                count += 1
                after = {"offset": following, "count": count, "size": size}
                yield FetchedMessage(raw, folder, str(offset)), after


# --- paths ------------------------------------------------------------------------------


def _check_path_text(field: str, value: str) -> None:
    """What can be refused without looking at the filesystem."""
    if "\0" in value:
        raise InvalidArgument(field, "must not contain a NUL character")
    if ".." in re.split(r"[/\\]", value):
        raise InvalidArgument(field, "must not contain '..'")


def resolve_source(field: str, given: str, root: Path, root_name: str) -> SourcePath:
    """`given` resolved inside `root`, or InvalidArgument naming `field`.

    A relative path is relative to `root`. The path must lie inside the root both
    as written and once symbolic links are resolved. The filesystem is not
    consulted for a path outside the root, so errors say nothing about such files.
    """
    _check_path_text(field, given)
    outside = f"must be inside the folder set by {root_name}"
    try:
        real_root = root.resolve()
    except (OSError, RuntimeError):
        raise InvalidArgument(field, f"cannot be read: {root_name} cannot be resolved") from None
    written = Path(os.path.normpath(root / given))  # `root / absolute` is the absolute path
    if not (written.is_relative_to(root) or written.is_relative_to(real_root)):
        raise InvalidArgument(field, outside)
    try:
        path = written.resolve(strict=True)
    except FileNotFoundError:
        raise InvalidArgument(field, "does not exist") from None
    except PermissionError:
        raise InvalidArgument(field, "is not readable") from None
    except (OSError, RuntimeError) as exc:  # a symbolic-link loop, a name too long, ...
        reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else "a loop"
        raise InvalidArgument(field, f"cannot be resolved ({reason})") from None
    if not path.is_relative_to(real_root):
        raise InvalidArgument(field, f"{outside} (a symbolic link leads outside it)")
    return SourcePath(field, given, path, real_root)


def _base_name(source: SourcePath) -> str:
    """The name of the file (or folder) as configured, else as resolved."""
    return PurePosixPath(source.given.replace("\\", "/")).name or source.path.name


def _read_head(source: SourcePath, size: int) -> bytes:
    """The first bytes of the file, proving it can be read."""
    try:
        with open(source.path, "rb") as handle:
            return handle.read(size)
    except PermissionError:
        raise InvalidArgument(source.field, "is not readable") from None
    except IsADirectoryError:
        raise InvalidArgument(source.field, "is a folder, not a file") from None
    except OSError as exc:
        raise InvalidArgument(
            source.field, f"is not readable ({os.strerror(exc.errno or errno.EIO)})"
        ) from None


def _require_regular_file(source: SourcePath) -> None:
    mode = source.path.stat().st_mode
    if stat.S_ISDIR(mode):
        raise InvalidArgument(source.field, "is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise InvalidArgument(source.field, "is not a regular file")


def _list_folder(top: Path) -> list[tuple[str, str]]:
    """(name, relative path) of every entry under `top` that is not a folder.

    Symbolic links to folders are listed (and later skipped), never followed.
    Names are POSIX relative paths as valid Unicode (undecodable bytes become
    `\\xNN`); the order is that of the names' bytes, the same on every run.
    """
    found: list[tuple[bytes, str, str]] = []

    def fail(exc: OSError) -> None:
        raise ProviderDataError(f"eml_import: a folder cannot be read: {exc.strerror}")

    for folder, dirs, files in os.walk(top, onerror=fail):
        base = Path(folder).relative_to(top)
        linked = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        for entry in [*files, *linked]:
            relative = (base / entry).as_posix()
            encoded = os.fsencode(relative)
            found.append((encoded, encoded.decode("utf-8", "backslashreplace"), relative))
    found.sort()
    return [(name, relative) for _, name, relative in found]


def _unique_ids(names: list[str]) -> list[str]:
    """Entry names as ids; a name that occurs again (zip allows it) gets `#2`, `#3`..."""
    seen: dict[str, int] = {}
    ids = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        ids.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return ids


# --- cursors and batches --------------------------------------------------------------


def _cursor_int(cursor: JsonDict | None, key: str) -> int:
    value = (cursor or {}).get(key, 0)
    if isinstance(value, float) and value.is_integer():  # JSON numbers through Struct
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProviderDataError(f"the saved import position is not valid ({key}={value!r})")
    return value


def _check_size(cursor: JsonDict | None, size: int, who: str) -> None:
    if cursor is not None and _cursor_int(cursor, "size") != size:
        raise ProviderDataError(
            f"{who}: the file changed since the import started "
            f"({_cursor_int(cursor, 'size')} bytes then, {size} now); start a new import"
        )


def _batched(
    items: Iterator[tuple[FetchedMessage, JsonDict]], max_messages: int, max_bytes: int
) -> Iterator[Batch]:
    """Group messages into bounded batches; each batch carries the cursor after it.

    Closing the returned generator (the engine does) closes `items` and so the file.
    """
    batch: list[FetchedMessage] = []
    size = 0
    cursor: JsonDict = {}
    try:
        for message, after in items:
            if batch and size + len(message.raw) > max_bytes:
                yield Batch(batch, cursor)
                batch, size = [], 0
            batch.append(message)
            size += len(message.raw)
            cursor = after
            if len(batch) >= max_messages:
                yield Batch(batch, cursor)
                batch, size = [], 0
        if batch:
            yield Batch(batch, cursor)
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


# --- mbox -------------------------------------------------------------------------------


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


# --- PST --------------------------------------------------------------------------------

# MAPI property tags (the property id; libpff matches any value type).
PR_MESSAGE_CLASS = 0x001A
PR_SENT_REPRESENTING_NAME = 0x0042
PR_SENT_REPRESENTING_EMAIL = 0x0065
PR_SENDER_NAME = 0x0C1A
PR_SENDER_EMAIL = 0x0C1F
PR_SENDER_SMTP = 0x5D01
PR_SENT_REPRESENTING_SMTP = 0x5D02
PR_SUBJECT = 0x0037
PR_TRANSPORT_HEADERS = 0x007D
PR_BODY = 0x1000
PR_HTML = 0x1013
PR_INTERNET_MESSAGE_ID = 0x1035
PR_IN_REPLY_TO = 0x1042
PR_REFERENCES = 0x1039
PR_INTERNET_CPID = 0x3FDE
PR_DISPLAY_NAME = 0x3001
PR_ADDRTYPE = 0x3002
PR_EMAIL_ADDRESS = 0x3003
PR_SMTP_ADDRESS = 0x39FE
PR_RECIPIENT_TYPE = 0x0C15
PR_ATTACH_FILENAME = 0x3704
PR_ATTACH_METHOD = 0x3705
PR_ATTACH_LONG_FILENAME = 0x3707
PR_ATTACH_MIME_TAG = 0x370E
PR_ATTACH_CONTENT_ID = 0x3712
PR_IPM_SUBTREE_ENTRYID = 0x35E0
ATTACH_EMBEDDED_MSG = 5
ATTACH_BY_REFERENCE = frozenset({2, 3, 4, 7})  # by reference ... by web reference
NID_TYPE_SEARCH_FOLDER = 0x03

# Header fields of the transport headers that the rebuilt MIME structure replaces.
MIME_FIELDS = frozenset({"content-type", "mime-version", "content-transfer-encoding"})
_HEADER_START = re.compile(r"[\x21-\x39\x3b-\x7e]+:")
_MIME_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# Windows code pages that have a MIME charset name other than "cpNNNN".
CODEPAGE_CHARSETS = {
    65001: "utf-8",
    20127: "us-ascii",
    1200: "utf-16le",
    1201: "utf-16be",
    28591: "iso-8859-1",
    28592: "iso-8859-2",
    28595: "iso-8859-5",
    28597: "iso-8859-7",
    28599: "iso-8859-9",
    28605: "iso-8859-15",
    20866: "koi8-r",
    21866: "koi8-u",
    932: "shift_jis",
    936: "gb2312",
    949: "ks_c_5601-1987",
    950: "big5",
    50220: "iso-2022-jp",
    51932: "euc-jp",
    51949: "euc-kr",
    52936: "hz-gb-2312",
    54936: "gb18030",
}


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
    _check_size(cursor, size, "pst_import")
    skip = _cursor_int(cursor, "count") if cursor else 0
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
                    FetchedMessage(raw, folder_path, message_id),
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
    entry_id = _prop_bytes(store, PR_IPM_SUBTREE_ENTRYID)
    if entry_id is None or len(entry_id) < 24:
        return None
    return int(struct.unpack_from("<I", entry_id, 20)[0])


# -- properties


def _entry(item: Any, tag: int) -> Any:
    try:
        if not item.number_of_record_sets:
            return None
        return item.get_record_set(0).get_entry_by_type(tag)
    except (OSError, RuntimeError, ValueError):
        return None


def _prop_bytes(item: Any, tag: int) -> bytes | None:
    entry = _entry(item, tag)
    if entry is None:
        return None
    data = entry.data
    return bytes(data) if data is not None else None


def _prop_text(item: Any, tag: int) -> str | None:
    entry = _entry(item, tag)
    if entry is None:
        return None
    try:
        text = entry.get_data_as_string()
    except (OSError, RuntimeError, ValueError):
        data = entry.data or b""
        text = data.decode("utf-16-le" if entry.value_type == 0x1F else "cp1252", "replace")
    return str(text).rstrip("\0") if text else None


def _prop_int(item: Any, tag: int) -> int | None:
    entry = _entry(item, tag)
    if entry is None:
        return None
    try:
        return int(entry.get_data_as_integer())
    except (OSError, RuntimeError, ValueError, TypeError):
        return None


def _attr(item: Any, name: str, tag: int | None = None) -> Any:
    """A pypff attribute; when libpff cannot convert it, the raw property `tag` as text."""
    try:
        return getattr(item, name)
    except (OSError, RuntimeError, ValueError):
        return _prop_text(item, tag) if tag is not None else None


def _body(item: Any, name: str, tag: int) -> bytes | None:
    """A body as pypff gives it (text bodies in UTF-8), or else the raw property.

    Never None for a body that exists: a body libpff cannot convert is taken raw
    (UTF-16 text re-encoded to UTF-8, other types as stored).
    """
    try:
        value = getattr(item, name)
    except (OSError, RuntimeError, ValueError):
        entry = _entry(item, tag)
        if entry is None or entry.data is None:
            raise
        data = bytes(entry.data)
        if entry.value_type == 0x1F:
            return data.decode("utf-16-le", "replace").rstrip("\0").encode("utf-8")
        return data.rstrip(b"\0") if entry.value_type == 0x1E else data
    return bytes(value) if value else None


# -- the MIME builder


@dataclass(frozen=True)
class _Part:
    headers: list[str]
    body: bytes

    def encode(self) -> bytes:
        return _header_bytes(self.headers) + b"\r\n" + self.body


def build_pst_message(message: Any) -> bytes:
    """The message as RFC 822 bytes, the same every time for the same message.

    Headers: the transport headers when the item has them (their Content-Type,
    MIME-Version and Content-Transfer-Encoding fields dropped; a Bcc field added
    from the recipient table when the headers have none), otherwise From, To,
    Cc, Bcc, Subject, Date, Message-ID, In-Reply-To and References from the
    item's properties. Body: text/plain (UTF-8) and text/html in a
    multipart/alternative; the RTF body only when there is neither; attachments
    after it in a multipart/mixed, each base64 with its name. Every body part is
    base64 (its bytes round-trip exactly); boundaries are hashes of the content
    they enclose. Lines end in CRLF.
    """
    structure = _pst_body(message)
    headers = _pst_headers(message)
    if not any(h.lower().startswith("message-id:") for h in headers):
        digest = hashlib.sha256(_header_bytes(headers) + structure.encode()).hexdigest()
        headers.append(f"Message-ID: <{digest[:40]}@pst-import.invalid>")
    return _header_bytes([*headers, "MIME-Version: 1.0", *structure.headers]) + (
        b"\r\n" + structure.body
    )


def _pst_body(message: Any) -> _Part:
    texts: list[_Part] = []
    plain = _body(message, "plain_text_body", PR_BODY)
    html = _body(message, "html_body", PR_HTML)
    codepage = _prop_int(message, PR_INTERNET_CPID)
    if plain:
        texts.append(_leaf("text/plain", plain, _charset(plain, 65001)))
    if html:
        texts.append(_leaf("text/html", html, _charset(html, codepage)))
    if not texts:
        rtf = message.rtf_body  # decompressed by libpff; a damaged one raises
        if rtf:
            texts.append(_leaf("text/rtf", bytes(rtf), None))
    if not texts:
        texts.append(_leaf("text/plain", b"", "us-ascii"))
    body = texts[0] if len(texts) == 1 else _multipart("alternative", texts)
    attachments = [_pst_attachment(message, i) for i in range(message.number_of_attachments)]
    return _multipart("mixed", [body, *attachments]) if attachments else body


def _pst_attachment(message: Any, index: int) -> _Part:
    attachment = message.get_attachment(index)
    name = (
        _attr(attachment, "long_filename")
        or _prop_text(attachment, PR_ATTACH_LONG_FILENAME)
        or _prop_text(attachment, PR_ATTACH_FILENAME)
        or _prop_text(attachment, PR_DISPLAY_NAME)
        or f"attachment-{index + 1}"
    )
    name = _single_line(str(name))
    content_id = _prop_text(attachment, PR_ATTACH_CONTENT_ID)
    extra = [f"Content-ID: <{_single_line(content_id).strip('<> ')}>"] if content_id else []
    disposition = f"Content-Disposition: attachment{_param('filename', name)}"
    method = _prop_int(attachment, PR_ATTACH_METHOD)
    if method == ATTACH_EMBEDDED_MSG:
        # An attached Outlook item: its "data" is a reference, never the item's bytes.
        embedded = _embedded_message(attachment)
        if embedded is None:
            return _unextracted(message, index, name, "an attached Outlook item", disposition)
        encoding = "7bit" if embedded.isascii() else "8bit"
        return _Part(
            [
                f"Content-Type: message/rfc822{_param('name', name)}",
                f"Content-Transfer-Encoding: {encoding}",
                disposition,
                *extra,
            ],
            embedded,
        )
    data = _attachment_data(attachment, name)
    if data is None:
        if method in ATTACH_BY_REFERENCE:
            return _unextracted(message, index, name, "a link to a file", disposition)
        raise ProviderDataError(f"pst_import: the data of attachment {name!r} cannot be read")
    mime = (_prop_text(attachment, PR_ATTACH_MIME_TAG) or "").strip().lower()
    # message/* and multipart/* may not be base64-encoded: their bytes go as a file.
    if not _MIME_TYPE.fullmatch(mime) or mime.startswith(("message/", "multipart/")):
        mime = "application/octet-stream"
    return _Part(
        [
            f"Content-Type: {mime}{_param('name', name)}",
            "Content-Transfer-Encoding: base64",
            disposition,
            *extra,
        ],
        _base64(data),
    )


def _attachment_data(attachment: Any, name: str) -> bytes | None:
    """The attachment's bytes; None when libpff has no data for it."""
    try:
        size = int(attachment.size or 0)
    except (OSError, RuntimeError, ValueError):
        return None
    chunks: list[bytes] = []
    remaining = size
    while remaining > 0:  # read_buffer takes a C int: read big attachments in pieces
        piece = attachment.read_buffer(min(remaining, 64 * 1024 * 1024))
        if not piece:
            break
        chunks.append(bytes(piece))
        remaining -= len(piece)
    data = b"".join(chunks)
    if len(data) != size:
        raise ProviderDataError(
            f"pst_import: attachment {name!r} is {size} bytes, only {len(data)} could be read"
        )
    return data


def _unextracted(message: Any, index: int, name: str, what: str, disposition: str) -> _Part:
    """A visible stand-in for an attachment whose content libpff-python cannot give.

    The message is archived (never dropped); the part says what is missing, and a
    warning is logged.
    """
    note = (
        f"This attachment ({what}) could not be extracted from the PST file: "
        "libpff-python gives no access to its content.\r\n"
    )
    logger.warning(
        "pst_import: message %s, attachment %d (%r): %s not extracted",
        _attr(message, "identifier"),
        index + 1,
        name,
        what,
    )
    return _Part(
        [
            f'Content-Type: text/plain; charset="utf-8"{_param("name", name)}',
            "Content-Transfer-Encoding: base64",
            disposition,
            f"X-Ingestion-Unextracted: {what}",
        ],
        _base64(note.encode()),
    )


def _embedded_message(attachment: Any) -> bytes | None:
    """An attached Outlook item rebuilt, if pypff exposes it as a sub-item."""
    try:
        if not attachment.number_of_sub_items:
            return None
        item = attachment.get_sub_item(0)
    except (OSError, RuntimeError, ValueError):
        return None
    if not hasattr(item, "number_of_attachments"):
        return None
    return build_pst_message(item)


def _leaf(mime: str, data: bytes, charset: str | None) -> _Part:
    """A base64 part: every byte of `data` comes back from the parser as is."""
    params = f'; charset="{charset}"' if charset else ""
    return _Part(
        [f"Content-Type: {mime}{params}", "Content-Transfer-Encoding: base64"], _base64(data)
    )


def _multipart(subtype: str, parts: list[_Part]) -> _Part:
    encoded = [part.encode() for part in parts]
    digest = hashlib.sha256()
    for chunk in encoded:
        digest.update(len(chunk).to_bytes(8, "big"))
        digest.update(chunk)
    # "=_" never occurs in base64 text, and our part headers never start with "--".
    boundary = f"=_{subtype}_{digest.hexdigest()[:32]}"
    delimiter = b"--" + boundary.encode("ascii")
    body = b"".join(delimiter + b"\r\n" + chunk + b"\r\n" for chunk in encoded)
    return _Part(
        [f'Content-Type: multipart/{subtype}; boundary="{boundary}"'],
        body + delimiter + b"--\r\n",
    )


def _base64(data: bytes) -> bytes:
    return b"\r\n".join(base64.b64encode(data[i : i + 57]) for i in range(0, len(data), 57))


def _charset(data: bytes, codepage: int | None) -> str:
    if data.isascii():
        return "us-ascii"
    if codepage and codepage != 65001:
        return CODEPAGE_CHARSETS.get(codepage, f"cp{codepage}")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown-8bit"
    return "utf-8"


def _param(name: str, value: str) -> str:
    """`; name="value"`, or RFC 2231 continuations for text that cannot be quoted."""
    quotable = value.isascii() and value.isprintable() and not {'"', "\\"} & set(value)
    if quotable and len(value) <= 900:
        return f'; {name}="{value}"'
    encoded = email.utils.encode_rfc2231(value, "utf-8")
    # Split between %XX escapes, into lines of at most ~70 characters.
    pieces: list[str] = []
    current = ""
    for token in re.findall(r"%[0-9A-Fa-f]{2}|.", encoded, re.DOTALL):
        if len(current) + len(token) > 60:
            pieces.append(current)
            current = ""
        current += token
    pieces.append(current)
    if len(pieces) == 1:
        return f"; {name}*={pieces[0]}"
    return "".join(f";\r\n {name}*{i}*={piece}" for i, piece in enumerate(pieces))


def _single_line(text: str) -> str:
    return " ".join(_LINE_BREAK.split(text)).replace("\0", "")


def _header_bytes(lines: list[str]) -> bytes:
    return "".join(f"{line}\r\n" for line in lines).encode("utf-8", "backslashreplace")


def _pst_headers(message: Any) -> list[str]:
    recipients = _recipients(message)
    transport = _attr(message, "transport_headers", PR_TRANSPORT_HEADERS)
    if transport and str(transport).strip():
        headers = _transport_headers(str(transport))
        bcc = recipients.get(3)
        if bcc and not any(h.lower().startswith("bcc:") for h in headers):
            headers.append(_address_header("Bcc", bcc))
        return headers
    headers = []
    sender = _sender(message)
    if sender:
        headers.append(_address_header("From", [sender]))
    for kind, field in ((1, "To"), (2, "Cc"), (3, "Bcc")):
        if recipients.get(kind):
            headers.append(_address_header(field, recipients[kind]))
    subject = _attr(message, "subject", PR_SUBJECT)
    if subject:
        headers.append(_text_header("Subject", str(subject)))
    when = (
        _attr(message, "client_submit_time")
        or _attr(message, "delivery_time")
        or _attr(message, "creation_time")
    )
    if isinstance(when, datetime):
        moment = when.replace(tzinfo=UTC) if when.tzinfo is None else when
        headers.append(f"Date: {email.utils.format_datetime(moment)}")
    for tag, field in (
        (PR_INTERNET_MESSAGE_ID, "Message-ID"),
        (PR_IN_REPLY_TO, "In-Reply-To"),
        (PR_REFERENCES, "References"),
    ):
        value = _prop_text(message, tag)
        if value and value.strip():
            headers.append(f"{field}: {_single_line(value).strip()}")
    return headers


def _transport_headers(text: str) -> list[str]:
    """The header lines, without the MIME fields, each one a valid header line."""
    lines: list[str] = []
    dropping = False
    for line in _LINE_BREAK.split(text):
        if not line.strip():
            continue  # blank lines would end the header block
        line = line.replace("\0", "")
        if _HEADER_START.match(line):
            dropping = line.split(":", 1)[0].strip().lower() in MIME_FIELDS
        elif line[0] in " \t" and lines:
            pass  # a continuation line
        elif lines:
            line = " " + line  # not a header: keep it as a continuation
        else:
            line = "X-Unparsed-Header: " + line.lstrip()
            dropping = False
        if not dropping:
            lines.append(line)
    return lines


def _sender(message: Any) -> tuple[str, str] | None:
    for name_tag, smtp_tag, email_tag in (
        (PR_SENT_REPRESENTING_NAME, PR_SENT_REPRESENTING_SMTP, PR_SENT_REPRESENTING_EMAIL),
        (PR_SENDER_NAME, PR_SENDER_SMTP, PR_SENDER_EMAIL),
    ):
        address = _prop_text(message, smtp_tag) or _prop_text(message, email_tag) or ""
        name = _prop_text(message, name_tag) or ""
        if address or name:
            return name, address
    name = _attr(message, "sender_name")
    return (str(name), "") if name else None


def _recipients(message: Any) -> dict[int, list[tuple[str, str]]]:
    """Recipients by type (1 To, 2 Cc, 3 Bcc), in the table's order."""
    found: dict[int, list[tuple[str, str]]] = {}
    table = _attr(message, "recipients")
    if table is None:
        return found
    try:
        count = int(table.number_of_record_sets)
    except (OSError, RuntimeError, ValueError):
        return found
    for index in range(count):
        try:
            record = table.get_record_set(index)
        except (OSError, RuntimeError, ValueError):
            continue
        holder = _RecordHolder(record)
        kind = _prop_int(holder, PR_RECIPIENT_TYPE) or 1
        name = _prop_text(holder, PR_DISPLAY_NAME) or ""
        address = _prop_text(holder, PR_SMTP_ADDRESS) or _prop_text(holder, PR_EMAIL_ADDRESS) or ""
        if name or address:
            found.setdefault(kind & 0x0F, []).append((name, address))
    return found


class _RecordHolder:
    """Lets the property helpers read one record set of a table."""

    number_of_record_sets = 1

    def __init__(self, record: Any) -> None:
        self._record = record

    def get_record_set(self, index: int) -> Any:
        return self._record


def _address_header(field: str, people: list[tuple[str, str]]) -> str:
    rendered = []
    for name, address in people:
        name, address = _single_line(name).strip(), _single_line(address).strip()
        if address:
            rendered.append(email.utils.formataddr((name, address), charset="utf-8"))
        elif name.isascii():
            rendered.append(f'"{email.utils.quote(name)}"')
        else:
            rendered.append(_encode_words(name))
    return f"{field}: " + ",\r\n ".join(rendered)


def _text_header(field: str, value: str) -> str:
    value = _single_line(value)
    if value.isascii() and len(value) < 900:
        return f"{field}: {value}"
    return f"{field}: {_encode_words(value, field)}"


def _encode_words(value: str, field: str = "") -> str:
    if value.isascii() and len(value) < 900:
        return value
    return email.header.Header(value, "utf-8", header_name=field or None).encode("\r\n")
