"""A FetchContext for calling a provider's `fetch` directly in a test, without the
engine: an archive that remembers what the test says was archived, and limits
kept in this process (the engine's shared ones are in Redis, tested on their own)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

from ingestion_grpc.providers.base import (
    Batch,
    ConcurrencyLimit,
    FetchContext,
    Limit,
    ProviderEnvironment,
    RateLimit,
)


class RememberingArchive:
    """`archived_ids` answers from the ids of the batches `record` was given."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    def archived_ids(self, provider_message_ids: Collection[str]) -> set[str]:
        return self.ids.intersection(provider_message_ids)

    def record(self, batches: Sequence[Batch]) -> None:
        for batch in batches:
            self.ids.update(m.provider_message_id for m in batch.messages)


class LocalLimiter:
    """The declared limits, enforced inside this process only."""

    def __init__(self, limits: Sequence[Limit]) -> None:
        self._limits = {limit.name: limit for limit in limits}
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}
        self._held: dict[tuple[str, str], int] = {}
        self._freed = threading.Condition(self._lock)

    def acquire(self, name: str, key: str, cost: float = 1.0) -> None:
        limit = self._limits[name]
        assert isinstance(limit, RateLimit), f"{name} is not a rate limit"
        with self._lock:
            tokens, at = self._buckets.get((name, key), (limit.burst, time.monotonic()))
            moment = time.monotonic()
            tokens = min(limit.burst, tokens + (moment - at) * limit.rate) - cost
            self._buckets[(name, key)] = (tokens, moment)
        if tokens < 0:
            time.sleep(-tokens / limit.rate)

    @contextlib.contextmanager
    def slot(self, name: str, key: str) -> Iterator[None]:
        limit = self._limits[name]
        assert isinstance(limit, ConcurrencyLimit), f"{name} is not a concurrency limit"
        with self._freed:
            while self._held.get((name, key), 0) >= limit.limit:
                self._freed.wait()
            self._held[(name, key)] = self._held.get((name, key), 0) + 1
        try:
            yield
        finally:
            with self._freed:
                self._held[(name, key)] -= 1
                self._freed.notify_all()


def local_context(limits: Sequence[Limit] = ()) -> tuple[FetchContext, RememberingArchive]:
    archive = RememberingArchive()
    return FetchContext(archive=archive, limits=LocalLimiter(limits)), archive


# For providers that use none of the engine's services (IMAP, files).
NO_CONTEXT = local_context()[0]

# For providers that read no local files (IMAP): roots nothing may be read from.
NO_ENVIRONMENT = ProviderEnvironment(
    import_root=Path("/nonexistent/imports"), upload_root=Path("/nonexistent/uploads")
)
