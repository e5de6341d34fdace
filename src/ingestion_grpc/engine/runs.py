"""A run: list the source's mailboxes, fan out one job each, and close it.

A run is a `SyncSession` row; its states and the source's are decided in
`domain/lifecycle.py`. Here is only what needs a provider: listing the mailboxes
and, once an import is complete, letting a one-shot input clean up.
"""

from __future__ import annotations

import logging

from ingestion_grpc.db.models import IngestionSource
from ingestion_grpc.domain import lifecycle
from ingestion_grpc.domain.lifecycle import RUN_STATUS, RunKind, RunState
from ingestion_grpc.engine.context import EngineContext
from ingestion_grpc.errors import IngestionError, ProviderUnavailable
from ingestion_grpc.providers.base import Provider
from ingestion_grpc.providers.registry import provider_class
from ingestion_grpc.telemetry import context

log = logging.getLogger(__name__)


def start_run(ctx: EngineContext, source_id: str, kind: RunKind, *, final_attempt: bool) -> None:
    """List the source's mailboxes into its open run and queue them."""
    with context.bound(source_id=source_id):
        with ctx.database.unit_of_work() as uow:
            source = uow.session.get(IngestionSource, source_id)
            if source is None or source.status != RUN_STATUS[kind]:
                return  # deleted, paused, or a duplicate message: nothing to do
            run = lifecycle.open_run(uow, source_id)
            if run is None:
                return
            run_id = run.id
            provider = ctx.provider_for(source)
        with context.bound(run_id=run_id, provider=provider.name):
            _list_and_send(ctx, run_id, source_id, provider, final_attempt=final_attempt)


def _list_and_send(
    ctx: EngineContext, run_id: str, source_id: str, provider: Provider, *, final_attempt: bool
) -> None:
    try:
        mailboxes = provider.list_mailboxes()
    except ProviderUnavailable as error:
        if not final_attempt:
            raise
        _end_unlisted(ctx, run_id, source_id, f"could not list mailboxes: {error}")
        return
    except IngestionError as error:
        _end_unlisted(ctx, run_id, source_id, f"could not list mailboxes: {error}")
        return

    with ctx.database.unit_of_work() as uow:
        sent = lifecycle.record_mailboxes(
            uow, run_id, mailboxes, provider.mailbox_concurrency(), ctx.jobs
        )
        uow.commit()
    log.info(
        "run %s of source %s: %d mailboxes listed, %s sent",
        run_id,
        source_id,
        len(mailboxes),
        sent,
    )
    finish_if_complete(ctx, run_id)


def finish_if_complete(ctx: EngineContext, run_id: str) -> None:
    """Close the run once no mailbox of it is pending or running."""
    with ctx.database.unit_of_work() as uow:
        source_id = lifecycle.source_of_run(uow, run_id)
        if source_id is None:
            return
        source = uow.session.get(IngestionSource, source_id)
        assert source is not None
        continuous = provider_class(source.provider).continuous_sync
        ended = lifecycle.end_run_if_complete(uow, run_id, ctx.sync_interval, continuous)
        uow.commit()
    if ended is not None and ended.outcome == RunState.COMPLETED and ended.kind == RunKind.IMPORT:
        # Only now may a one-shot input (an uploaded file) go: every message is in.
        ctx.provider_for(source).after_successful_import()


def _end_unlisted(ctx: EngineContext, run_id: str, source_id: str, error: str) -> None:
    with ctx.database.unit_of_work() as uow:
        source = uow.session.get(IngestionSource, source_id)
        if source is None:
            return
        continuous = provider_class(source.provider).continuous_sync
        lifecycle.end_run_unlisted(uow, run_id, error, ctx.sync_interval, continuous)
        uow.commit()
