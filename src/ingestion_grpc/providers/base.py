"""The one small interface every provider implements.

A provider knows how to talk to one kind of mail store. It does not know about
jobs, state, checkpoints, deduplication or storage: the ingestion engine owns
those. Adding a provider is adding a module here and a line in `registry.py`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ingestion_grpc.errors import InvalidArgument, ProviderDataError

JsonDict = dict[str, Any]


@dataclass(frozen=True)
class FetchedMessage:
    """One message exactly as the provider served it."""

    raw: bytes
    folder_path: str
    provider_message_id: str


@dataclass(frozen=True)
class Batch:
    """Messages to archive, and the cursor that is true once all are archived."""

    messages: list[FetchedMessage]
    cursor: JsonDict


@dataclass(frozen=True)
class ProviderEnvironment:
    """What the deployment, not the source, decides: where local files may be read."""

    import_root: Path
    upload_root: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ProviderEnvironment:
        """The roots as Settings reads them (IMPORT_ROOT, UPLOAD_ROOT, under DATA_DIR)."""
        data_dir = Path(environ.get("DATA_DIR") or "./data")
        return cls(
            import_root=Path(environ.get("IMPORT_ROOT") or data_dir / "imports").resolve(),
            upload_root=Path(environ.get("UPLOAD_ROOT") or data_dir / "uploads").resolve(),
        )


@dataclass(frozen=True)
class ConfigField:
    """One accepted `providerConfig` field and its JSON type."""

    name: str
    kind: type | tuple[type, ...]
    required: bool = True
    secret: bool = False


class Provider:
    """Base class: subclasses set `name` and `fields` and override the methods.

    `validate_config` is shared: it checks the declared fields and calls
    `check_values` for provider-specific rules.
    """

    name: ClassVar[str]
    fields: ClassVar[tuple[ConfigField, ...]]
    # False for one-shot sources (files): they are imported, never synced.
    continuous_sync: ClassVar[bool] = True

    def __init__(
        self, config: Mapping[str, Any], environment: ProviderEnvironment | None = None
    ) -> None:
        self.config = dict(config)
        self.environment = environment or ProviderEnvironment.from_env()

    @classmethod
    def secret_fields(cls) -> frozenset[str]:
        return frozenset(f.name for f in cls.fields if f.secret)

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> JsonDict:
        """Return a clean copy of `config`, or raise InvalidArgument naming the field."""
        known = {f.name: f for f in cls.fields}
        for key in config:
            if key not in known:
                raise InvalidArgument(
                    f"providerConfig.{key}", f"is not a field of a {cls.name} source"
                )
        clean: JsonDict = {}
        for spec in cls.fields:
            value = config.get(spec.name)
            if value is None:
                if spec.required:
                    raise InvalidArgument(f"providerConfig.{spec.name}", "is required")
                continue
            if not _has_kind(value, spec.kind):
                raise InvalidArgument(
                    f"providerConfig.{spec.name}", f"must be {_kind_name(spec.kind)}"
                )
            if isinstance(value, str) and spec.required and not value.strip():
                raise InvalidArgument(f"providerConfig.{spec.name}", "must not be empty")
            if isinstance(value, float) and not isinstance(value, bool):
                value = int(value)
            clean[spec.name] = value
        cls.check_values(clean)
        return clean

    @classmethod
    def check_values(cls, config: JsonDict) -> None:
        """Provider-specific validation of a structurally valid config."""

    def check_connection(self) -> None:
        """Prove the settings work; raise ConnectionCheckFailed saying what failed."""
        raise NotImplementedError

    def list_mailboxes(self) -> list[str]:
        """Name every mailbox of the source: one for IMAP, each user for a tenant."""
        raise NotImplementedError

    def fetch(self, mailbox: str, cursor: JsonDict | None) -> Iterator[Batch]:
        """Yield the mailbox's messages after `cursor`, in batches, oldest first."""
        raise NotImplementedError

    def after_successful_import(self) -> None:
        """Called once an import archived every message; for one-shot inputs to clean up."""


def _has_kind(value: Any, kind: type | tuple[type, ...]) -> bool:
    # JSON numbers arrive as floats through google.protobuf.Struct.
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, float):
        return int in kinds and value.is_integer()
    if isinstance(value, bool) and bool not in kinds:
        return False
    return isinstance(value, kinds)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", bool: "true or false", int: "an integer", list: "a list"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


class ConfigOnlyProvider(Provider):
    """A provider whose mail reading is not built yet.

    Its configuration is validated and stored (encrypted) so that sources can be
    set up now; every run fails at once with a message saying so, instead of
    being retried.
    """

    display_name: ClassVar[str]

    def check_connection(self) -> None:
        """Only the configuration's structure is checked for now."""

    def list_mailboxes(self) -> list[str]:
        raise ProviderDataError(
            f"importing from {self.display_name} is not available in this version yet"
        )
