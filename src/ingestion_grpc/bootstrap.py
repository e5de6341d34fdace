"""The one place that wires Settings, the database, the queue, the blob store, the
shared limits and the providers, for the server, the worker and the scheduler.

Every environment variable is read once, into `Settings`; an entry point calls
`settings_or_exit()` first, so a bad value (`GRPC_PORT=abc`) stops the start with
one line naming the variable, never a traceback.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections.abc import Mapping

import redis

from ingestion_grpc.archive.blobstore import blob_store_from_settings
from ingestion_grpc.config import LIMIT_PREFIX, Environ, Settings
from ingestion_grpc.crypto import CredentialCipher
from ingestion_grpc.db.session import Database
from ingestion_grpc.domain.lifecycle import JobQueue
from ingestion_grpc.domain.sources import SourceService
from ingestion_grpc.engine.context import EngineContext
from ingestion_grpc.engine.limits import RedisLimiter
from ingestion_grpc.errors import ConfigurationError
from ingestion_grpc.jobs.queue import DramatiqJobQueue, redis_broker
from ingestion_grpc.providers.base import Limit, Provider, ProviderEnvironment, RateLimit
from ingestion_grpc.providers.registry import PROVIDERS, register
from ingestion_grpc.telemetry import exposition, logs

# Exit status of a process whose configuration is wrong (as for bad usage).
CONFIGURATION_ERROR_EXIT = 2


def load_settings(environ: Environ = os.environ) -> Settings:
    """Settings from `environ`, with provider plug-ins loaded and limits checked."""
    settings = Settings.from_env(environ)
    for plugin in settings.provider_plugins:
        register(_load_plugin(plugin))
    declared_limits(settings.limit_overrides)  # an override naming no limit is an error
    return settings


def settings_or_exit(environ: Environ = os.environ) -> Settings:
    try:
        return load_settings(environ)
    except ConfigurationError as error:
        print(f"configuration error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(CONFIGURATION_ERROR_EXIT) from None


def configure_logging(settings: Settings) -> None:
    """LOG_LEVEL and LOG_FORMAT (human-readable text, or one JSON object a line)."""
    logs.configure(settings.log_level, settings.log_format)


def configure_metrics(settings: Settings) -> None:
    """Metrics of this process go where the server's `/metrics` adds them up."""
    exposition.enable_multiprocess(settings.metrics_dir)


def _load_plugin(spec: str) -> type[Provider]:
    module_name, _, class_name = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigurationError(
            f"PROVIDER_PLUGINS: cannot load {spec!r} (module:Class): {exc}"
        ) from None
    if not (isinstance(found, type) and issubclass(found, Provider)):
        raise ConfigurationError(f"PROVIDER_PLUGINS: {spec!r} is not a Provider class")
    return found


def declared_limits(overrides: Mapping[str, float]) -> list[Limit]:
    """Every provider's declared limits, with the operator's LIMIT_* overrides."""
    limits: dict[str, Limit] = {}
    for cls in PROVIDERS.values():
        for limit in cls.limits:
            value = overrides.get(limit.name)
            if value is not None:
                limit = (
                    dataclasses.replace(limit, rate=value)
                    if isinstance(limit, RateLimit)
                    else dataclasses.replace(limit, limit=max(1, int(value)))
                )
            limits[limit.name] = limit
    for name in overrides:
        if name not in limits:
            known = ", ".join(LIMIT_PREFIX + n.upper() for n in sorted(limits)) or "none"
            raise ConfigurationError(
                f"{LIMIT_PREFIX}{name.upper()} names no declared limit (known: {known})"
            )
    return list(limits.values())


def provider_environment(settings: Settings) -> ProviderEnvironment:
    return ProviderEnvironment(
        import_root=settings.import_root,
        upload_root=settings.upload_root,
        google_api_endpoint=settings.google_api_endpoint,
        microsoft_authority_host=settings.microsoft_authority_host,
        microsoft_graph_endpoint=settings.microsoft_graph_endpoint,
        limit_overrides=dict(settings.limit_overrides),
    )


def job_queue(settings: Settings) -> DramatiqJobQueue:
    return DramatiqJobQueue(redis_broker(settings.redis_url, settings.queue_namespace))


def engine_context(settings: Settings, jobs: JobQueue) -> EngineContext:
    return EngineContext(
        database=Database(settings.database_url),
        cipher=CredentialCipher(settings.encryption_key),
        blobs=blob_store_from_settings(settings),
        jobs=jobs,
        limits=RedisLimiter(
            redis.Redis.from_url(settings.redis_url),
            settings.queue_namespace,
            declared_limits(settings.limit_overrides),
        ),
        sync_interval=settings.sync_interval,
        stale_after=settings.stale_run_after,
        provider_environment=provider_environment(settings),
    )


def source_service(settings: Settings, database: Database, jobs: JobQueue) -> SourceService:
    return SourceService(
        database,
        CredentialCipher(settings.encryption_key),
        jobs,
        blob_store_from_settings(settings),
        provider_environment(settings),
    )
