"""The gRPC server: `python -m ingestion_grpc.server`.

Applies migrations, makes sure the first admin and the settings row exist,
then serves the API with health checking and reflection. SIGTERM / SIGINT
stop it gracefully: in-flight calls get a grace period to finish.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from datetime import timedelta

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from ingestion.v1 import (
    archive_service_pb2,
    archive_service_pb2_grpc,
    audit_service_pb2,
    audit_service_pb2_grpc,
    auth_service_pb2,
    auth_service_pb2_grpc,
    ingestion_service_pb2,
    ingestion_service_pb2_grpc,
    settings_service_pb2,
    settings_service_pb2_grpc,
    upload_service_pb2,
    upload_service_pb2_grpc,
)

from ingestion_grpc import bootstrap
from ingestion_grpc.api.archive import ArchiveServicer
from ingestion_grpc.api.audit import AuditServicer
from ingestion_grpc.api.auth import ApiKeyServicer, AuthServicer
from ingestion_grpc.api.ingestion import IngestionServicer
from ingestion_grpc.api.interceptors import AuthInterceptor, ErrorInterceptor
from ingestion_grpc.api.metrics import MetricsInterceptor
from ingestion_grpc.api.settings import SettingsServicer
from ingestion_grpc.api.upload import UploadServicer
from ingestion_grpc.api.validation import ValidationInterceptor
from ingestion_grpc.archive.blobstore import blob_store_from_settings
from ingestion_grpc.auth.services import ensure_first_admin
from ingestion_grpc.config import Settings
from ingestion_grpc.db.migrate import upgrade_to_head
from ingestion_grpc.db.session import Database, ping
from ingestion_grpc.domain.lifecycle import JobQueue
from ingestion_grpc.domain.settings import ensure_settings
from ingestion_grpc.domain.uploads import UploadStore
from ingestion_grpc.stop_request import StopRequest
from ingestion_grpc.telemetry import exposition

log = logging.getLogger(__name__)

HEALTH_PERIOD_SECONDS = 2.0
SHUTDOWN_GRACE_SECONDS = 10.0
SERVICE_NAMES = (
    ingestion_service_pb2.DESCRIPTOR.services_by_name["IngestionService"].full_name,
    auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name,
    auth_service_pb2.DESCRIPTOR.services_by_name["ApiKeyService"].full_name,
    settings_service_pb2.DESCRIPTOR.services_by_name["SettingsService"].full_name,
    archive_service_pb2.DESCRIPTOR.services_by_name["ArchiveService"].full_name,
    upload_service_pb2.DESCRIPTOR.services_by_name["UploadService"].full_name,
    audit_service_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
)
# Largest request message: an upload piece from a native gRPC client may be up
# to 4 MiB of data (gRPC's usual limit) plus its framing. Envoy sends smaller ones.
MAX_RECEIVE_MESSAGE_BYTES = 4 * 1024 * 1024 + 64 * 1024
# Request headers (gRPC metadata). gRPC's defaults (8 KiB, then refusing at
# random up to 16 KiB) sit below Envoy's own limit, so a long bearer token got a
# random 429. Envoy refuses headers past `max_request_headers_kb` (32 KiB, in
# envoy/envoy.yaml.in) with 431; this leaves room for the headers Envoy adds
# (x-envoy-original-path repeats the path) so that what Envoy lets through, the
# server takes. One limit, no soft one: nothing is refused at random.
MAX_METADATA_BYTES = 64 * 1024
METADATA_OPTIONS = [
    ("grpc.max_metadata_size", MAX_METADATA_BYTES),
    ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
]
# How far a client (Envoy) may send ahead of what an RPC has read, per stream.
# gRPC's default grows this window with its bandwidth-delay estimate; an upload
# whose disk writes stall (writeback) then piled up to ~200 MiB in this process.
# A fixed 4 MiB keeps it flat at the same speed (docs/benchmarks.md). Envoy runs
# next to the server, so the round trip is short and 4 MiB suffices.
RECEIVE_WINDOW_OPTIONS = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4 << 20)]
# A partial upload untouched for this long was left by a server that died.
STALE_PARTIAL_UPLOAD_AGE = timedelta(hours=1)


@dataclass
class RunningServer:
    """A started server, its port, and what must be closed with it."""

    server: grpc.Server
    port: int
    database: Database
    health: health.HealthServicer
    _stop_watching: threading.Event
    metrics: exposition.MetricsListener

    @property
    def metrics_port(self) -> int:
        """The Prometheus listener's port (METRICS_PORT, or the free one picked)."""
        return self.metrics.port

    def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        self._stop_watching.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.metrics.stop()
        self.database.dispose()


def prepare_database(
    database: Database, settings: Settings, admin_email: str, admin_password: str | None
) -> None:
    """Migrate, then create the settings row and, on an empty instance, the admin."""
    upgrade_to_head(database.engine)
    with database.unit_of_work() as uow:
        ensure_settings(uow, settings.enable_deletion_default)
        generated = ensure_first_admin(uow, admin_email, admin_password)
        uow.commit()
    if generated:
        # Shown once, on the console of the first start; never stored in clear.
        print(
            f"Created the first admin {admin_email} with password: {generated}\n"
            "Keep it now: it is not shown again.",
            flush=True,
        )


def _watch_health(
    database: Database, jobs: JobQueue, servicer: health.HealthServicer, stop: threading.Event
) -> None:
    while True:
        try:
            ping(database.engine)
            jobs.ping()
            status = health_pb2.HealthCheckResponse.SERVING
        except Exception:
            log.warning("database or job queue unreachable; reporting NOT_SERVING")
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            servicer.set(name, status)
        if stop.wait(HEALTH_PERIOD_SECONDS):
            return


def start_server(
    settings: Settings,
    *,
    port: int | None = None,
    jobs: JobQueue | None = None,
) -> RunningServer:
    """Build and start a server; `port=0` picks a free one (tests)."""
    # Before any RPC is counted: this process's values must go to the shared files.
    bootstrap.configure_metrics(settings)
    database = Database(settings.database_url)
    prepare_database(database, settings, settings.admin_email, settings.admin_password)
    jobs = jobs or bootstrap.job_queue(settings)
    blobs = blob_store_from_settings(settings)
    sources = bootstrap.source_service(settings, database, jobs)

    uploads = UploadStore(settings.upload_root, settings.max_upload_bytes)
    uploads.remove_stale_partials(STALE_PARTIAL_UPLOAD_AGE)

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="rpc"),
        # In this order around each call: metrics see the status the client gets.
        interceptors=[
            MetricsInterceptor(),
            ErrorInterceptor(),
            AuthInterceptor(database, settings.jwt_secret),
            ValidationInterceptor(),
        ],
        options=[
            ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
            *RECEIVE_WINDOW_OPTIONS,
            *METADATA_OPTIONS,
        ],
    )
    ingestion_service_pb2_grpc.add_IngestionServiceServicer_to_server(
        IngestionServicer(database, sources), server
    )
    auth_service_pb2_grpc.add_AuthServiceServicer_to_server(
        AuthServicer(
            database,
            settings.jwt_secret,
            settings.jwt_expires_in,
            bootstrap.login_throttle(settings),
            settings.trusted_proxies,
        ),
        server,
    )
    auth_service_pb2_grpc.add_ApiKeyServiceServicer_to_server(ApiKeyServicer(database), server)
    settings_service_pb2_grpc.add_SettingsServiceServicer_to_server(
        SettingsServicer(database), server
    )
    archive_service_pb2_grpc.add_ArchiveServiceServicer_to_server(
        ArchiveServicer(database, blobs), server
    )
    upload_service_pb2_grpc.add_UploadServiceServicer_to_server(
        UploadServicer(database, uploads), server
    )
    audit_service_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(database), server)
    health_servicer = health.HealthServicer()
    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    metrics = exposition.serve(settings.metrics_dir, settings.metrics_port, jobs.backlog)
    bound = server.add_insecure_port(f"[::]:{settings.grpc_port if port is None else port}")
    server.start()

    stop_watching = threading.Event()
    threading.Thread(
        target=_watch_health,
        args=(database, jobs, health_servicer, stop_watching),
        name="health",
        daemon=True,
    ).start()
    return RunningServer(server, bound, database, health_servicer, stop_watching, metrics)


def main() -> None:
    settings = bootstrap.settings_or_exit()
    bootstrap.configure_logging(settings)
    running = start_server(settings)
    log.info(
        "gRPC server listening on port %d; metrics on port %d", running.port, running.metrics_port
    )

    # No lock in the handler: a second SIGTERM could otherwise deadlock it (stop_request.py).
    with StopRequest().installed((signal.SIGTERM, signal.SIGINT)) as stopping:
        stopping.wait()
        log.info("shutting down")
        running.stop()


if __name__ == "__main__":
    main()
