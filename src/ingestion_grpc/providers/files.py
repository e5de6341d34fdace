"""File imports: one PST, EML or mbox source, from a path on this server or an upload.

The three providers (`mbox.py`, `eml.py`, `pst.py`) share one config
(`localFilePath` or `uploadedFilePath`), the `FileImport` base below, and differ
in the file format they read. Every one of them:

* accepts only paths inside its root: `localFilePath` inside IMPORT_ROOT (a
  relative path is relative to it), `uploadedFilePath` inside UPLOAD_ROOT, both
  checked after resolving symbolic links (the roots come from the process's
  settings, as `self.environment`);
* streams: memory stays bounded by one batch plus the largest message, whatever
  the size of the file;
* yields batches in a deterministic order whose cursor (a small JSON object)
  resumes exactly after the batch, in another process, after a crash. A cursor
  also records the size of the file (or, for a folder, the name of the last
  entry read), so a file that changed under a running import stops it with
  ProviderDataError instead of skipping or repeating messages;
* is imported once, never synced (`continuous_sync = False`);
* once an import has archived every message, deletes the uploaded file it read
  (`uploadedFilePath`, when it is a `<name>.upload` file the upload endpoint
  stored directly in UPLOAD_ROOT); a `localFilePath` is never modified or removed.

Errors: a bad path or a file of the wrong format is InvalidArgument naming
`providerConfig.localFilePath` (or `uploadedFilePath`); a file found damaged
while reading, or changed since the import started, is ProviderDataError.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from ingestion_grpc.errors import InvalidArgument, ProviderDataError
from ingestion_grpc.providers.base import (
    PATH_TEXT,
    Batch,
    ConfigField,
    FetchContext,
    FetchedMessage,
    JsonDict,
    Mailbox,
    Provider,
    ProviderEnvironment,
)

logger = logging.getLogger(__name__)

LOCAL = "localFilePath"
UPLOADED = "uploadedFilePath"
# The name ending of every file the upload endpoint stores (`domain/uploads.py`):
# only such files are removed after their import.
UPLOAD_SUFFIX = ".upload"

# Batch bounds: a batch closes at this many messages or before this many raw bytes
# (a single message larger than that travels alone).
MAX_BATCH_MESSAGES = 500
MAX_BATCH_BYTES = 32 * 1024 * 1024
# The largest single message an mbox or EML import holds in memory. A larger one
# stops the import with ProviderDataError (never a silent skip).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class SourcePath:
    """A configured path that passed the root checks."""

    field: str  # "providerConfig.localFilePath" or "providerConfig.uploadedFilePath"
    given: str  # the configured value
    path: Path  # resolved, inside `root`
    root: Path  # resolved root


class FileImport(Provider):
    """Base of the file imports: exactly one of `localFilePath` / `uploadedFilePath`.

    Subclasses set `name` and `file_format` and implement `check_format` and
    `read`. Their limits are integer class attributes (like `batch_messages`);
    a keyword argument of the same name overrides one for an instance.
    """

    file_format: ClassVar[str]
    continuous_sync = False
    fields = (
        # A path readable by the service on its own machine, inside IMPORT_ROOT.
        ConfigField(LOCAL, str, required=False, text=PATH_TEXT),
        # The path an earlier upload returned, inside UPLOAD_ROOT.
        ConfigField(UPLOADED, str, required=False, text=PATH_TEXT),
    )
    batch_messages: int = MAX_BATCH_MESSAGES
    batch_bytes: int = MAX_BATCH_BYTES

    def __init__(
        self,
        config: Mapping[str, Any],
        environment: ProviderEnvironment,
        **limits: int,
    ) -> None:
        super().__init__(config, environment)
        for name, value in limits.items():
            if type(getattr(type(self), name, None)) is not int:
                raise TypeError(f"{type(self).__name__} has no limit {name!r}")
            setattr(self, name, value)

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

    def list_mailboxes(self) -> list[Mailbox]:
        """One mailbox: the base name of the file (or folder)."""
        name = base_name(self.source())
        return [Mailbox(name, name)]

    def fetch(
        self, mailbox: Mailbox, cursor: JsonDict | None, context: FetchContext
    ) -> Iterator[Batch]:
        source = self.source()
        expected = self.list_mailboxes()[0].id
        if mailbox.id != expected:
            raise InvalidArgument("mailbox", f"is not a mailbox of this source (it has {expected})")
        self.check_format(source)
        return _batched(
            self.read(source, dict(cursor) if cursor else None),
            self.batch_messages,
            self.batch_bytes,
        )

    def after_successful_import(self) -> None:
        """Delete the uploaded file this source read; a local file is left alone.

        Only what the upload endpoint stores is removed: a `<name>.upload` entry
        directly in UPLOAD_ROOT (a symbolic link there is removed itself, never
        what it points at). Anything else an `uploadedFilePath` names, inside
        UPLOAD_ROOT but put there some other way, is kept and a warning says so.
        A file already gone is fine. Failures are logged, never raised: every
        message is archived by now, and a file left behind is only disk space.
        """
        if UPLOADED not in self.config:
            return
        given = str(self.config[UPLOADED])
        root = self.environment.upload_root
        written = Path(os.path.normpath(root / given))  # `root / absolute` is the absolute path
        if written.parent != root or not written.name.endswith(UPLOAD_SUFFIX):
            logger.warning(
                "%s: uploaded file %r kept: only %s files directly in UPLOAD_ROOT are removed",
                self.name,
                given,
                UPLOAD_SUFFIX,
            )
            return
        try:
            os.unlink(written)
        except FileNotFoundError:
            logger.info("%s: uploaded file %r is already gone", self.name, given)
        except OSError as exc:
            logger.warning("%s: uploaded file %r not removed: %s", self.name, given, exc.strerror)
        else:
            logger.info("%s: imported, so removed the uploaded file %r", self.name, given)

    # -- for the subclasses

    def source(self) -> SourcePath:
        """The configured path, resolved and checked, or InvalidArgument naming the field."""
        if LOCAL in self.config:
            field, root, label = LOCAL, self.environment.import_root, "IMPORT_ROOT"
        else:
            field, root, label = UPLOADED, self.environment.upload_root, "UPLOAD_ROOT"
        return resolve_source(
            f"providerConfig.{field}", str(self.config.get(field, "")), root, label
        )

    def check_format(self, source: SourcePath) -> None:
        raise NotImplementedError

    def read(
        self, source: SourcePath, cursor: JsonDict | None
    ) -> Iterator[tuple[FetchedMessage, JsonDict]]:
        """Every message after `cursor`, each with the cursor that is true after it."""
        raise NotImplementedError


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


def base_name(source: SourcePath) -> str:
    """The name of the file (or folder) as configured, else as resolved."""
    return PurePosixPath(source.given.replace("\\", "/")).name or source.path.name


def read_head(source: SourcePath, size: int) -> bytes:
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


def require_regular_file(source: SourcePath) -> None:
    mode = source.path.stat().st_mode
    if stat.S_ISDIR(mode):
        raise InvalidArgument(source.field, "is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise InvalidArgument(source.field, "is not a regular file")


# --- cursors and batches --------------------------------------------------------------


def cursor_int(cursor: JsonDict | None, key: str) -> int:
    value = (cursor or {}).get(key, 0)
    if isinstance(value, float) and value.is_integer():  # JSON numbers through Struct
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProviderDataError(f"the saved import position is not valid ({key}={value!r})")
    return value


def check_size(cursor: JsonDict | None, size: int, who: str) -> None:
    if cursor is not None and cursor_int(cursor, "size") != size:
        raise ProviderDataError(
            f"{who}: the file changed since the import started "
            f"({cursor_int(cursor, 'size')} bytes then, {size} now); start a new import"
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
