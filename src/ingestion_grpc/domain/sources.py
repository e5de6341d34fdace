"""Operations on ingestion sources, as the API calls them.

Each function takes the request's unit of work and its caller; the API layer
commits. Queued jobs are sent only after that commit.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, tuple_

from ingestion_grpc.archive import catalog, sweep
from ingestion_grpc.archive.blobstore import BlobStore
from ingestion_grpc.auth.permissions import Principal
from ingestion_grpc.crypto import CredentialCipher
from ingestion_grpc.db.models import IngestionSource, RunMailbox, SyncSession, new_id
from ingestion_grpc.db.session import Database, UnitOfWork
from ingestion_grpc.domain import lifecycle, settings
from ingestion_grpc.domain.lifecycle import JobQueue, RunKind, SourceStatus
from ingestion_grpc.domain.paging import (
    decode_name_token,
    decode_token,
    encode_name_token,
    encode_token,
    page_size,
)
from ingestion_grpc.errors import FailedPrecondition, InvalidArgument, NotFound
from ingestion_grpc.providers.base import JsonDict, Provider, ProviderEnvironment
from ingestion_grpc.providers.registry import provider_class
from ingestion_grpc.telemetry import context

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
        # never created. (Its requests are counted under the provider's name.)
        with context.bound(provider=provider):
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
        lifecycle.claim_run(uow, source, RunKind.IMPORT, self._jobs)
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
            with context.bound(provider=provider):
                provider_class(provider)(config, self._provider_environment).check_connection()
            source.provider = provider
            source.sealed_config = self._cipher.seal(config, bound_to=source.id)
        if changes.status is not None:
            lifecycle.set_status(uow, source, changes.status, self._jobs)
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

    def run_mailboxes(
        self,
        uow: UnitOfWork,
        principal: Principal,
        source_id: str,
        run_id: str,
        size: int,
        token: str,
    ) -> tuple[list[RunMailbox], str]:
        """The mailboxes of one run with their progress, by display name."""
        self.get(uow, principal, source_id)
        run = uow.session.get(SyncSession, run_id)
        if run is None or run.source_id != source_id:
            raise NotFound(f"Sync session {run_id} not found.")
        limit = page_size(size, default=100, maximum=1000)
        query = select(RunMailbox).where(RunMailbox.run_id == run_id)
        after = decode_name_token(token)
        if after is not None:
            query = query.where(
                tuple_(RunMailbox.display_name, RunMailbox.mailbox) > tuple_(*after)
            )
        rows = list(
            uow.session.scalars(
                query.order_by(RunMailbox.display_name, RunMailbox.mailbox).limit(limit + 1)
            )
        )
        if len(rows) <= limit:
            return rows, ""
        rows = rows[:limit]
        return rows, encode_name_token(rows[-1].display_name, rows[-1].mailbox)

    def _delete_unreferenced_blobs(self, digests: set[str]) -> None:
        """Blobs shared with another source's rows stay; the rest go."""
        sweep.delete_unreferenced(self._database, self._blobs, sorted(digests))

    def pause(self, uow: UnitOfWork, principal: Principal, source_id: str) -> IngestionSource:
        source = self.get(uow, principal, source_id)
        lifecycle.pause(source)
        uow.session.flush()
        return source

    def start_run(
        self, uow: UnitOfWork, principal: Principal, source_id: str, kind: RunKind
    ) -> SyncSession:
        """Claim an import or sync of the source; the run it opened (or continued)."""
        source = self.get(uow, principal, source_id)
        if kind is RunKind.SYNC and not provider_class(source.provider).continuous_sync:
            raise FailedPrecondition(
                "File sources have no continuous sync: trigger an import to read the file again."
            )
        return lifecycle.claim_run(uow, source, kind, self._jobs)

    def provider_config(self, source: IngestionSource) -> JsonDict:
        """The decrypted configuration, for the engine. Never for a response."""
        return self._cipher.open(source.sealed_config, bound_to=source.id)

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
