"""Now and then, from the scheduler's tick: remove the uploads nobody uses.

`domain/uploads.remove_expired` does the work; this module decides when (at
most every SWEEP_EVERY in a process: any number of schedulers may sweep, each
removal is conditional) and tells it which files sources still name.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from sqlalchemy import select

from ingestion_grpc.db.models import IngestionSource
from ingestion_grpc.domain import uploads
from ingestion_grpc.engine.context import EngineContext
from ingestion_grpc.providers.files import UPLOADED, FileImport
from ingestion_grpc.providers.registry import PROVIDERS

log = logging.getLogger(__name__)

SWEEP_EVERY_SECONDS = 600.0

_lock = threading.Lock()
_next_sweep = 0.0


def sweep_if_due(ctx: EngineContext) -> None:
    global _next_sweep
    with _lock:
        if time.monotonic() < _next_sweep:
            return
        _next_sweep = time.monotonic() + SWEEP_EVERY_SECONDS
    sweep(ctx)


def sweep(ctx: EngineContext) -> int:
    """Remove the expired unused uploads now; how many went."""
    root = ctx.provider_environment.upload_root
    store = uploads.UploadStore(root, max_bytes=0)
    return uploads.remove_expired(
        ctx.database, store, ctx.upload_ttl, lambda: _names_in_use(ctx, root)
    )


def _names_in_use(ctx: EngineContext, root: Path) -> set[str]:
    """The upload file names that file sources' configs name (decrypted here)."""
    file_providers = [name for name, cls in PROVIDERS.items() if issubclass(cls, FileImport)]
    with ctx.database.unit_of_work() as uow:
        sources = list(
            uow.session.scalars(
                select(IngestionSource).where(IngestionSource.provider.in_(file_providers))
            )
        )
    names = set()
    for source in sources:
        config = ctx.cipher.open(source.sealed_config, bound_to=source.id)
        if UPLOADED in config:
            names.add(Path(os.path.normpath(root / str(config[UPLOADED]))).name)
    return names
