"""What the engine's functions need, built once per worker process (`bootstrap.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from ingestion_grpc.archive.blobstore import BlobStore
from ingestion_grpc.crypto import CredentialCipher
from ingestion_grpc.db.models import IngestionSource
from ingestion_grpc.db.session import Database
from ingestion_grpc.domain.lifecycle import JobQueue
from ingestion_grpc.providers.base import Limiter, Provider, ProviderEnvironment
from ingestion_grpc.providers.registry import provider_class


@dataclass(frozen=True)
class EngineContext:
    database: Database
    cipher: CredentialCipher
    blobs: BlobStore
    jobs: JobQueue
    limits: Limiter
    sync_interval: timedelta
    stale_after: timedelta
    provider_environment: ProviderEnvironment
    # An upload no source uses is removed this long after it was made.
    upload_ttl: timedelta = timedelta(hours=24)

    def provider_for(self, source: IngestionSource) -> Provider:
        config = self.cipher.open(source.sealed_config, bound_to=source.id)
        return provider_class(source.provider)(config, self.provider_environment)
