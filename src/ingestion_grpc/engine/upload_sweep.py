"""Now and then, from the scheduler's loop: remove the uploads nobody uses.

`domain/uploads.remove_expired` does the work; this module decides when (at
most every SWEEP_EVERY_SECONDS in a scheduler; any number of schedulers may
sweep, each removal is conditional) and tells it which files sources still name.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from sqlalchemy import select

from ingestion_grpc.db.models import IngestionSource
from ingestion_grpc.domain import uploads
from ingestion_grpc.engine.context import EngineContext
from ingestion_grpc.errors import IngestionError
from ingestion_grpc.providers.files import UPLOADED, FileImport
from ingestion_grpc.providers.registry import PROVIDERS

log = logging.getLogger(__name__)

SWEEP_EVERY_SECONDS = 600.0


class PeriodicUploadSweep:
    """Runs `sweep` at most every `every_seconds` (the first time at once)."""

    def __init__(self, every_seconds: float = SWEEP_EVERY_SECONDS) -> None:
        self._every = every_seconds
        self._next = time.monotonic()

    def run_if_due(self, ctx: EngineContext) -> None:
        if time.monotonic() < self._next:
            return
        # Scheduled before it runs: a failing sweep is not retried every tick.
        self._next = time.monotonic() + self._every
        sweep(ctx)


def sweep(ctx: EngineContext) -> int:
    """Remove the expired unused uploads now; how many went."""
    root = ctx.provider_environment.upload_root
    store = uploads.UploadStore(root, max_bytes=0)
    return uploads.remove_expired(
        ctx.database, store, ctx.upload_ttl, lambda: _names_in_use(ctx, root)
    )


def _names_in_use(ctx: EngineContext, root: Path) -> set[str] | None:
    """The upload file names that file sources' configs name (decrypted here), or
    None when a config cannot be read: then nobody can say a file is unused."""
    file_providers = [name for name, cls in PROVIDERS.items() if issubclass(cls, FileImport)]
    with ctx.database.unit_of_work() as uow:
        sources = list(
            uow.session.scalars(
                select(IngestionSource).where(IngestionSource.provider.in_(file_providers))
            )
        )
    names = set()
    for source in sources:
        try:
            config = ctx.cipher.open(source.sealed_config, bound_to=source.id)
        except IngestionError as error:
            log.warning("source %s: its settings cannot be read (%s)", source.id, error)
            return None
        if UPLOADED in config:
            names.add(Path(os.path.normpath(root / str(config[UPLOADED]))).name)
    return names
