"""Operations on ingestion sources, as the API calls them.

Each function takes the request's unit of work and its caller; the API layer
commits. Queued jobs are sent only after that commit.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, tuple_, update

from ingestion_grpc.archive import catalog
from ingestion_grpc.archive.blobstore import BlobStore
from ingestion_grpc.auth.permissions import Principal
from ingestion_grpc.crypto import CredentialCipher
from ingestion_grpc.db.models import IngestionSource, SyncSession, new_id
from ingestion_grpc.db.session import Database, UnitOfWork
from ingestion_grpc.domain import settings
from ingestion_grpc.domain.paging import decode_token, encode_token, page_size
from ingestion_grpc.domain.states import (
    CLIENT_SETTABLE,
    IDLE,
    RUN_STATUS,
    RUNNING,
    RunKind,
    SourceStatus,
)
from ingestion_grpc.engine.runs import open_or_resume_run, open_run
from ingestion_grpc.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound
from ingestion_grpc.jobs.queue import JobQueue
from ingestion_grpc.providers.base import JsonDict, Provider, ProviderEnvironment
from ingestion_grpc.providers.registry import provider_class

log = logging.getLogger(__name__)

DELETION_DISABLED = "Deletion is disabled for this instance."


@dataclass(frozen=True)
class SourceChanges:
    """What an Update asks for; None means 'leave as it is'."""

    name: str | None = None
    provider: str | None = None
    status: str | None = None
    provider_config: Mapping[str, Any] | None = None


class SourceService:
    def __init__(
        self,
        database: Database,
        cipher: CredentialCipher,
        jobs: JobQueue,
        blobs: BlobStore,
        provider_environment: ProviderEnvironment,
    ) -> None:
        self._provider_environment = provider_environment
        self._database = database
        self._cipher = cipher
        self._jobs = jobs
        self._blobs = blobs

    def create(
        self,
        uow: UnitOfWork,
        principal: Principal,
        name: str,
        provider: str,
        provider_config: Mapping[str, Any] | None,
    ) -> IngestionSource:
        name = _valid_name(name)
        cls = provider_class(provider)
        if provider_config is None:
            raise InvalidArgument("providerConfig", "is required")
        config = cls.validate_config(provider_config)
        # Checked before anything is stored: a source that cannot connect is
        # never created.
        cls(config, self._provider_environment).check_connection()
        source_id = new_id()
        source = IngestionSource(
            id=source_id,
            owner_id=principal.user_id,
            name=name,
            provider=provider,
            status=SourceStatus.AUTH_SUCCESS,
            sealed_config=self._cipher.seal(config, bound_to=source_id),
        )
        uow.session.add(source)
        uow.session.flush()
        log.info("source %s (%s) created by user %s", source_id, provider, principal.user_id)
        self._start_run(uow, source, RunKind.IMPORT)
        return source

    def list_visible(self, uow: UnitOfWork, principal: Principal) -> list[IngestionSource]:
        query = select(IngestionSource).order_by(
            IngestionSource.created_at.desc(), IngestionSource.id
        )
        if not principal.sees_all_sources:
            query = query.where(IngestionSource.owner_id == principal.user_id)
        return list(uow.session.scalars(query))

    def get(self, uow: UnitOfWork, principal: Principal, source_id: str) -> IngestionSource:
        source = uow.session.get(IngestionSource, source_id)
        if source is None or not (
            principal.sees_all_sources or source.owner_id == principal.user_id
        ):
            # The same answer for "missing" and "not yours": never reveal
            # that someone else's source exists.
            raise NotFound(f"Ingestion source {source_id} not found.")
        return source

    def update(
        self, uow: UnitOfWork, principal: Principal, source_id: str, changes: SourceChanges
    ) -> IngestionSource:
        source = self.get(uow, principal, source_id)
        if changes.name is not None:
            source.name = _valid_name(changes.name)
        if changes.provider is not None or changes.provider_config is not None:
            provider, config = self._changed_config(source, changes)
            provider_class(provider)(config, self._provider_environment).check_connection()
            source.provider = provider
            source.sealed_config = self._cipher.seal(config, bound_to=source.id)
        if changes.status is not None:
            self._set_status(uow, source, changes.status)
        uow.session.flush()
        return source

    def delete(self, uow: UnitOfWork, principal: Principal, source_id: str) -> None:
        source = self.get(uow, principal, source_id)
        if not settings.get_settings(uow).enable_deletion:
            raise FailedPrecondition(DELETION_DISABLED)
        digests = catalog.digests_of_source(uow, source_id)
        # Rows of runs, cursors and archived emails go with it (ON DELETE CASCADE).
        uow.session.delete(source)
        uow.session.flush()
        uow.after_commit(lambda: self._delete_unreferenced_blobs(digests))
        log.info("source %s deleted by user %s", source_id, principal.user_id)

    def sync_sessions(
        self, uow: UnitOfWork, principal: Principal, source_id: str, size: int, token: str
    ) -> tuple[list[SyncSession], str]:
        self.get(uow, principal, source_id)
        limit = page_size(size, default=50, maximum=500)
        query = select(SyncSession).where(SyncSession.source_id == source_id)
        after = decode_token(token)
        if after is not None:
            query = query.where(tuple_(SyncSession.started_at, SyncSession.id) < tuple_(*after))
        runs = list(
            uow.session.scalars(
                query.order_by(SyncSession.started_at.desc(), SyncSession.id.desc()).limit(
                    limit + 1
                )
            )
        )
        if len(runs) <= limit:
            return runs, ""
        runs = runs[:limit]
        return runs, encode_token(runs[-1].started_at, runs[-1].id)

    def _delete_unreferenced_blobs(self, digests: set[str]) -> None:
        """Blobs shared with another source's rows stay; the rest go."""
        ordered = sorted(digests)
        for start in range(0, len(ordered), 1000):
            with self._database.unit_of_work() as uow:
                orphans = catalog.unreferenced(uow, set(ordered[start : start + 1000]))
            for digest in orphans:
                self._blobs.delete(digest)

    def pause(self, uow: UnitOfWork, principal: Principal, source_id: str) -> IngestionSource:
        source = self.get(uow, principal, source_id)
        source.status = SourceStatus.PAUSED
        uow.session.flush()
        return source

    def start_run(
        self, uow: UnitOfWork, principal: Principal, source_id: str, kind: RunKind
    ) -> IngestionSource:
        source = self.get(uow, principal, source_id)
        if kind is RunKind.SYNC and not provider_class(source.provider).continuous_sync:
            raise FailedPrecondition(
                "File sources have no continuous sync: trigger an import to read the file again."
            )
        self._start_run(uow, source, kind)
        return source

    def provider_config(self, source: IngestionSource) -> JsonDict:
        """The decrypted configuration, for the engine. Never for a response."""
        return self._cipher.open(source.sealed_config, bound_to=source.id)

    def _start_run(self, uow: UnitOfWork, source: IngestionSource, kind: RunKind) -> None:
        previous = SourceStatus(source.status)
        # One conditional UPDATE: of two concurrent requests only one matches.
        claimed = uow.session.execute(
            update(IngestionSource)
            .where(IngestionSource.id == source.id, IngestionSource.status.in_(IDLE))
            .values(status=RUN_STATUS[kind], run_requested_at=func.now())
            .returning(IngestionSource.id)
            .execution_options(synchronize_session=False)
        ).first()
        if claimed is None:
            uow.session.refresh(source)
            if source.status == SourceStatus.PAUSED:
                raise Conflict("The source is paused: resume it before starting a run.")
            if source.status in RUNNING:
                raise Conflict("An import or sync is already running for this source.")
            raise Conflict(f"A run cannot start while the source is {source.status}.")
        uow.session.refresh(source)
        open_or_resume_run(uow, source, kind)
        uow.after_commit(lambda: self._send_or_release(source.id, kind, previous))

    def _send_or_release(self, source_id: str, kind: RunKind, previous: SourceStatus) -> None:
        try:
            self._jobs.enqueue_run(source_id, kind)
        except Exception:
            # The claim is committed but no worker will ever see it: give the
            # source back so the caller can retry.
            with self._database.unit_of_work() as uow:
                uow.session.execute(
                    update(IngestionSource)
                    .where(
                        IngestionSource.id == source_id,
                        IngestionSource.status == RUN_STATUS[kind],
                    )
                    .values(status=previous)
                )
                uow.commit()
            raise

    def _changed_config(
        self, source: IngestionSource, changes: SourceChanges
    ) -> tuple[str, JsonDict]:
        provider = changes.provider if changes.provider is not None else source.provider
        cls = provider_class(provider)
        if provider != source.provider:
            if changes.provider_config is None:
                raise InvalidArgument(
                    "providerConfig", f"is required, complete, when changing provider to {provider}"
                )
            return provider, cls.validate_config(changes.provider_config)
        stored = self.provider_config(source)
        merged = _merge_config(stored, changes.provider_config or {}, cls)
        return provider, cls.validate_config(merged)

    def _set_status(self, uow: UnitOfWork, source: IngestionSource, status: str) -> None:
        if status not in CLIENT_SETTABLE:
            raise InvalidArgument(
                "status",
                "may only be set to active or paused; other statuses are set by the engine",
            )
        if status == SourceStatus.PAUSED or source.status == SourceStatus.ACTIVE:
            source.status = status
            return
        if source.status in RUNNING:
            raise Conflict("An import or sync is running: pause the source instead.")
        interrupted = open_run(uow, source.id)
        source.status = SourceStatus.ACTIVE
        if interrupted is not None:
            # Resuming continues the run that the pause interrupted, from the
            # checkpoints its mailboxes saved.
            uow.session.flush()
            self._start_run(uow, source, RunKind(interrupted.kind))


def _merge_config(stored: JsonDict, changes: Mapping[str, Any], cls: type[Provider]) -> JsonDict:
    """Changes over the stored config; an omitted or empty secret keeps its value."""
    merged = dict(stored)
    secrets = cls.secret_fields()
    for key, value in changes.items():
        if key in secrets and (value is None or value == ""):
            continue
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def _valid_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= 200:
        raise InvalidArgument("name", "must be 1 to 200 characters")
    return name
