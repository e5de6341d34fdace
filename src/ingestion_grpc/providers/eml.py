"""eml_import: .eml files in a .zip or a folder (the shared rules are in `files.py`).

A .zip of .eml files, or a folder walked recursively. The bytes archived are the
.eml file's bytes. Entries are read in sorted order of their names; the folder part
of a name becomes the folder path (`Archive/2002`; "" for the top level). Other
entries (not ending in .eml, empty files, `__MACOSX/` metadata, names that climb out
of the archive such as `../evil.eml` or `/etc/x.eml`, symbolic links leading out of
the root, special files) are skipped, logged and counted in `skipped`: nothing is
extracted to disk, so such names are harmless, but they are not imported. A zip
entry over `max_entry_bytes` uncompressed, or compressed more than `max_ratio`:1
(for entries over `ratio_min_bytes`), stops the import with ProviderDataError: it is
a zip bomb, or a message too large to archive.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ingestion_grpc.errors import InvalidArgument, ProviderDataError
from ingestion_grpc.providers.base import FetchedMessage, JsonDict, ProviderEnvironment
from ingestion_grpc.providers.files import (
    MAX_MESSAGE_BYTES,
    FileImport,
    SourcePath,
    check_size,
    cursor_int,
    read_head,
    require_regular_file,
)

logger = logging.getLogger(__name__)

# Zip-bomb guard: an entry over RATIO_MIN_BYTES uncompressed may not be compressed
# more than MAX_COMPRESSION_RATIO:1.
MAX_COMPRESSION_RATIO = 200
RATIO_MIN_BYTES = 1024 * 1024


class EmlImport(FileImport):
    """EML: RFC 5322 messages, one message per file, in a .zip or a folder."""

    name = "eml_import"
    file_format = "EML"

    max_entry_bytes: int = MAX_MESSAGE_BYTES
    max_ratio: int = MAX_COMPRESSION_RATIO
    ratio_min_bytes: int = RATIO_MIN_BYTES

    def __init__(
        self,
        config: Mapping[str, Any],
        environment: ProviderEnvironment,
        **limits: int,
    ) -> None:
        super().__init__(config, environment, **limits)
        # Entries not imported (see the module docstring), counted since the import
        # began (the count travels in the cursor), and the last names skipped.
        self.skipped = 0
        self.skipped_names: list[str] = []

    def check_format(self, source: SourcePath) -> None:
        if source.path.is_dir():
            if not os.access(source.path, os.R_OK | os.X_OK):
                raise InvalidArgument(source.field, "is not readable")
            return
        require_regular_file(source)
        read_head(source, 4)
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
        index = cursor_int(cursor, "index")
        last = cursor.get("name")
        if index > len(names) or (index > 0 and names[index - 1] != last):
            raise ProviderDataError(
                "eml_import: the source changed since the import started "
                f"(entry {index} is no longer {last!r}); start a new import"
            )
        self.skipped = cursor_int(cursor, "skipped")
        return index

    # -- zip

    def _read_zip(
        self, source: SourcePath, cursor: JsonDict | None
    ) -> Iterator[tuple[FetchedMessage, JsonDict]]:
        size = source.path.stat().st_size
        check_size(cursor, size, "eml_import")
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
                yield FetchedMessage(raw, (folder,), ids[index]), after

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
            yield FetchedMessage(raw, (name.rpartition("/")[0],), name), after

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
