"""What the engine's functions need, built once per worker process."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from ingestion_grpc.archive.blobstore import BlobStore, blob_store_from_settings
from ingestion_grpc.config import Settings
from ingestion_grpc.crypto import CredentialCipher
from ingestion_grpc.db.models import IngestionSource
from ingestion_grpc.db.session import Database
from ingestion_grpc.jobs.queue import JobQueue
from ingestion_grpc.providers.base import Provider, ProviderEnvironment
from ingestion_grpc.providers.registry import provider_class


@dataclass(frozen=True)
class EngineContext:
    database: Database
    cipher: CredentialCipher
    blobs: BlobStore
    jobs: JobQueue
    sync_interval: timedelta
    stale_after: timedelta
    provider_environment: ProviderEnvironment

    @classmethod
    def from_settings(cls, settings: Settings, jobs: JobQueue) -> EngineContext:
        return cls(
            database=Database(settings.database_url),
            cipher=CredentialCipher(settings.encryption_key),
            blobs=blob_store_from_settings(settings.data_dir),
            jobs=jobs,
            sync_interval=settings.sync_interval,
            stale_after=settings.stale_run_after,
            provider_environment=settings.provider_environment,
        )

    def provider_for(self, source: IngestionSource) -> Provider:
        config = self.cipher.open(source.sealed_config, bound_to=source.id)
        return provider_class(source.provider)(config, self.provider_environment)
