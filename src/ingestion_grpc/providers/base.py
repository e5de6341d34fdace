"""The provider contract (version 2): the one small interface every provider implements.

A provider knows how to talk to one kind of mail store. It does not know about
jobs, run state, checkpoints, deduplication or storage: the ingestion engine owns
those. Adding a provider is adding a module here and a line in `registry.py`.

The contract, in the order the engine calls it:

* `check_connection()` proves the settings work before a source is stored.
* `list_mailboxes()` returns `Mailbox` records: a stable `id` (what the provider
  addresses the mailbox by), a `display_name` for people, and a `skip_reason`
  when the mailbox cannot be read at all (no licence, suspended, a guest). A
  skipped mailbox is reported on the run, tried again on the next run, and never
  makes the run or the source fail.
* `fetch(mailbox, cursor, context)` yields `Batch`es after `cursor`. Batches come
  in a deterministic order, and each carries the cursor that is true once it and
  every earlier batch are archived; the engine stores that cursor in the same
  transaction as the batch. A provider may fetch concurrently inside a mailbox
  (up to its API's limit) as long as it hands batches over in that order.
  `context` gives the provider the engine's services: which of its message ids
  are archived already (`context.archive`), and rate limits shared by every
  worker process on every machine (`context.limits`).
* `after_successful_import()` lets a one-shot input (an uploaded file) clean up.

A batch holds the messages fetched (each with the set of folders it sits in), the
messages the archive already holds and that were only seen again (`known`: their
folder paths are merged, their bytes are not downloaded again), and the messages
that could not be fetched: `skipped` (gone from the source between listing and
fetching) and `failed` (failing for now: the provider keeps them in its cursor
and fetches them again on the next run).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from ingestion_grpc.errors import InvalidArgument, ProviderDataError
from ingestion_grpc.text import TextRule, check_text

JsonDict = dict[str, Any]


@dataclass(frozen=True)
class Mailbox:
    """One mailbox of a source: an IMAP account, a file, a user of a tenant."""

    # Stable: what the provider addresses the mailbox by (a user's object id).
    id: str
    # What an admin reads: an email address, a UPN, a file name.
    display_name: str
    # Non-empty when the mailbox cannot be read at all; it is then skipped.
    skip_reason: str = ""


@dataclass(frozen=True)
class FetchedMessage:
    """One message exactly as the provider served it, and every folder it is in."""

    raw: bytes
    folder_paths: tuple[str, ...]
    provider_message_id: str


@dataclass(frozen=True)
class KnownMessage:
    """A message the archive already holds (`context.archive` said so), seen again.

    Its folder paths are merged into the archived row; nothing is downloaded.
    """

    provider_message_id: str
    folder_paths: tuple[str, ...]


@dataclass(frozen=True)
class Unfetched:
    """A message the provider listed but could not fetch, and why."""

    provider_message_id: str
    reason: str


@dataclass(frozen=True)
class Batch:
    """What one step of a fetch produced, and the cursor that is true after it."""

    messages: Sequence[FetchedMessage]
    cursor: JsonDict
    known: Sequence[KnownMessage] = ()
    # Gone from the source between listing and fetching: counted as skipped.
    skipped: Sequence[Unfetched] = ()
    # Failing for now: counted as failed; the cursor keeps them for the next run.
    failed: Sequence[Unfetched] = ()


class ArchiveLookup(Protocol):
    """What the archive holds for the mailbox being fetched."""

    def archived_ids(self, provider_message_ids: Collection[str]) -> set[str]:
        """Those of `provider_message_ids` already archived for this mailbox."""
        ...


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: `rate` units a second, at most `burst` at once, per key.

    Declared by a provider (e.g. 250 units/s for one Gmail user); shared by every
    worker process on every machine. LIMIT_<NAME> (upper case) overrides `rate`.
    """

    name: str
    rate: float
    burst: float


@dataclass(frozen=True)
class ConcurrencyLimit:
    """At most `limit` holders at once per key (e.g. 4 requests for one mailbox).

    Each holder has a lease of `lease_seconds`: a worker killed while holding one
    frees it when the lease expires. LIMIT_<NAME> (upper case) overrides `limit`.
    """

    name: str
    limit: int
    lease_seconds: float = 120.0


Limit = RateLimit | ConcurrencyLimit


class Limiter(Protocol):
    """Rate limits shared by every worker, by the names a provider declared."""

    def acquire(self, name: str, key: str, cost: float = 1.0) -> None:
        """Block until `cost` units of bucket `name` for `key` may be spent."""
        ...

    def slot(self, name: str, key: str) -> AbstractContextManager[None]:
        """Hold one of the concurrency limit `name`'s places for `key` while inside."""
        ...


@dataclass(frozen=True)
class FetchContext:
    """The engine's services a fetch may use."""

    archive: ArchiveLookup
    limits: Limiter


@dataclass(frozen=True)
class ProviderEnvironment:
    """What the deployment, not the source, decides (read once into Settings)."""

    import_root: Path
    upload_root: Path
    # One base URL replacing the root of Google's Directory and Gmail APIs.
    google_api_endpoint: str = ""
    microsoft_authority_host: str = "https://login.microsoftonline.com"
    microsoft_graph_endpoint: str = "https://graph.microsoft.com"
    # The limits after the operator's LIMIT_* overrides, by limit name.
    limit_overrides: Mapping[str, float] = field(default_factory=dict)


# A config string (or each string of a list): one line of at most this much.
CONFIG_TEXT = TextRule(1024)
# A host name (RFC 1035: 253 characters at most) or an IP address.
HOST_TEXT = TextRule(253)
# A file's path on the server (Linux's PATH_MAX).
PATH_TEXT = TextRule(4096)


@dataclass(frozen=True)
class ConfigField:
    """One accepted `providerConfig` field, its JSON type and, for text, its rule."""

    name: str
    kind: type | tuple[type, ...]
    required: bool = True
    secret: bool = False
    text: TextRule = CONFIG_TEXT


class Provider:
    """Base class: subclasses set `name` and `fields` and override the methods.

    `validate_config` is shared: it checks the declared fields and calls
    `check_values` for provider-specific rules.
    """

    name: ClassVar[str]
    fields: ClassVar[tuple[ConfigField, ...]]
    # False for one-shot sources (files): they are imported, never synced.
    continuous_sync: ClassVar[bool] = True
    # The shared limits `fetch` asks `context.limits` for, by name.
    limits: ClassVar[tuple[Limit, ...]] = ()
    # How many of one source's mailboxes may run at once; a source's
    # `maxConcurrentMailboxes` (for providers that declare the field) overrides it.
    max_concurrent_mailboxes: ClassVar[int] = 8

    def __init__(self, config: Mapping[str, Any], environment: ProviderEnvironment) -> None:
        self.config = dict(config)
        self.environment = environment

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
            _check_texts(f"providerConfig.{spec.name}", value, spec.text)
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

    def mailbox_concurrency(self) -> int:
        """How many of this source's mailboxes may run at once."""
        configured = self.config.get(MAX_CONCURRENT_MAILBOXES)
        return int(configured) if configured else self.max_concurrent_mailboxes

    def check_connection(self) -> None:
        """Prove the settings work; raise ConnectionCheckFailed saying what failed."""
        raise NotImplementedError

    def list_mailboxes(self) -> list[Mailbox]:
        """Every mailbox of the source: one for IMAP and files, each user for a tenant."""
        raise NotImplementedError

    def fetch(
        self, mailbox: Mailbox, cursor: JsonDict | None, context: FetchContext
    ) -> Iterator[Batch]:
        """Yield the mailbox's batches after `cursor`, in a deterministic order,
        each with the cursor that is true once it and every earlier one are archived."""
        raise NotImplementedError

    def after_successful_import(self) -> None:
        """Called once an import archived every message; for one-shot inputs to clean up."""


# The optional per-source cap on mailboxes running at once, for tenant providers.
MAX_CONCURRENT_MAILBOXES = "maxConcurrentMailboxes"
MAX_CONCURRENT_MAILBOXES_FIELD = ConfigField(MAX_CONCURRENT_MAILBOXES, int, required=False)


def check_mailbox_concurrency(config: JsonDict) -> None:
    """`maxConcurrentMailboxes`, when given, is 1 to 1,000."""
    value = config.get(MAX_CONCURRENT_MAILBOXES)
    if value is not None and not 1 <= value <= 1000:
        raise InvalidArgument(f"providerConfig.{MAX_CONCURRENT_MAILBOXES}", "must be 1 to 1000")


def check_patterns(config: JsonDict, *names: str) -> None:
    """Each of the named glob-pattern lists holds non-empty strings only."""
    for name in names:
        for index, pattern in enumerate(config.get(name) or ()):
            if not isinstance(pattern, str) or not pattern.strip():
                raise InvalidArgument(
                    f"providerConfig.{name}",
                    f"item {index} must be a non-empty string (a name or a glob "
                    'pattern such as "Archive/*")',
                )


def _check_texts(field: str, value: Any, rule: TextRule) -> None:
    """A string, or the strings of a list, against the field's rule."""
    for text in value if isinstance(value, list) else (value,):
        if isinstance(text, str):
            check_text(field, text, rule)


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

    def list_mailboxes(self) -> list[Mailbox]:
        raise ProviderDataError(
            f"importing from {self.display_name} is not available in this version yet"
        )
