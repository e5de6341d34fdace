"""The running service as one API key's holder sees it: a gRPC channel and its stubs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.api import httpbody_pb2
from google.protobuf import struct_pb2
from ingestion.v1 import (
    ingestion_service_pb2,
    ingestion_service_pb2_grpc,
    resources_pb2,
    upload_service_pb2_grpc,
)

from ingestion_grpc.client.errors import UsageError, from_rpc
from ingestion_grpc.config import ClientSettings

T = TypeVar("T")

# Unary calls answer quickly; one that takes this long is a service in trouble.
CALL_TIMEOUT_SECONDS = 60.0
# Upload pieces: well under the server's 4 MiB message limit.
UPLOAD_PIECE_BYTES = 1024 * 1024
# A page of a run's mailboxes (the most the API gives at once).
MAILBOX_PAGE_SIZE = 1000


class Service:
    """The service at `settings.target`, called with `settings.api_key`."""

    def __init__(self, settings: ClientSettings) -> None:
        if not settings.api_key:
            raise UsageError("no API key: set INGESTION_API_KEY or pass --api-key")
        self.target = settings.target
        self._channel = (
            grpc.secure_channel(settings.target, grpc.ssl_channel_credentials())
            if settings.secure
            else grpc.insecure_channel(settings.target)
        )
        self._metadata = (("x-api-key", settings.api_key),)
        self._sources = ingestion_service_pb2_grpc.IngestionServiceStub(self._channel)
        self._uploads = upload_service_pb2_grpc.UploadServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., T], request: Any, **options: Any) -> T:
        try:
            return method(request, metadata=self._metadata, **options)
        except grpc.RpcError as error:
            raise from_rpc(error, self.target) from None

    def list_sources(self) -> list[resources_pb2.IngestionSource]:
        def every() -> list[resources_pb2.IngestionSource]:
            stream = self._sources.ListIngestionSources(
                ingestion_service_pb2.ListIngestionSourcesRequest(),
                metadata=self._metadata,
                timeout=CALL_TIMEOUT_SECONDS,
            )
            return list(stream)

        try:
            return every()
        except grpc.RpcError as error:
            raise from_rpc(error, self.target) from None

    def get_source(self, source_id: str) -> resources_pb2.IngestionSource:
        request = ingestion_service_pb2.GetIngestionSourceRequest(id=source_id)
        return self._call(self._sources.GetIngestionSource, request, timeout=CALL_TIMEOUT_SECONDS)

    def create_source(
        self, name: str, provider: str, config: dict[str, Any]
    ) -> resources_pb2.IngestionSource:
        struct = struct_pb2.Struct()
        struct.update(config)
        request = ingestion_service_pb2.CreateIngestionSourceRequest(
            name=name, provider=provider, provider_config=struct
        )
        # The service checks the connection first: a slow server takes its time.
        return self._call(self._sources.CreateIngestionSource, request, timeout=300.0)

    def pause(self, source_id: str) -> resources_pb2.IngestionSource:
        request = ingestion_service_pb2.PauseIngestionSourceRequest(id=source_id)
        return self._call(self._sources.PauseIngestionSource, request, timeout=CALL_TIMEOUT_SECONDS)

    def resume(self, source_id: str) -> resources_pb2.IngestionSource:
        request = ingestion_service_pb2.UpdateIngestionSourceRequest(id=source_id, status="active")
        return self._call(
            self._sources.UpdateIngestionSource, request, timeout=CALL_TIMEOUT_SECONDS
        )

    def sync(self, source_id: str) -> str:
        """Start a sync; the run's id."""
        request = ingestion_service_pb2.ForceSyncRequest(id=source_id)
        answer = self._call(self._sources.ForceSync, request, timeout=CALL_TIMEOUT_SECONDS)
        return answer.sync_session_id

    def latest_run(self, source_id: str) -> resources_pb2.SyncSession | None:
        request = ingestion_service_pb2.ListSyncSessionsRequest(id=source_id, page_size=1)
        answer = self._call(self._sources.ListSyncSessions, request, timeout=CALL_TIMEOUT_SECONDS)
        return answer.sync_sessions[0] if answer.sync_sessions else None

    def run(self, source_id: str, run_id: str) -> resources_pb2.SyncSession:
        """One run of the source, looked up among its newest ones."""
        token = ""
        while True:
            request = ingestion_service_pb2.ListSyncSessionsRequest(
                id=source_id, page_size=50, page_token=token
            )
            answer = self._call(
                self._sources.ListSyncSessions, request, timeout=CALL_TIMEOUT_SECONDS
            )
            for run in answer.sync_sessions:
                if run.id == run_id:
                    return run
            token = answer.next_page_token
            if not token:
                raise UsageError(f"source {source_id} has no run {run_id}")

    def run_mailboxes(self, source_id: str, run_id: str) -> list[resources_pb2.SyncSessionMailbox]:
        rows: list[resources_pb2.SyncSessionMailbox] = []
        token = ""
        while True:
            request = ingestion_service_pb2.ListSyncSessionMailboxesRequest(
                id=source_id, session_id=run_id, page_size=MAILBOX_PAGE_SIZE, page_token=token
            )
            answer = self._call(
                self._sources.ListSyncSessionMailboxes, request, timeout=CALL_TIMEOUT_SECONDS
            )
            rows.extend(answer.mailboxes)
            token = answer.next_page_token
            if not token:
                return rows

    def upload(self, path: Path, sent: Callable[[int], None]) -> str:
        """Stream the file to UploadService; `sent(n)` after each piece; its server path."""

        def pieces(handle: Iterable[bytes]) -> Iterator[httpbody_pb2.HttpBody]:
            first = True
            for piece in handle:
                # The content type is read from the first piece only.
                yield httpbody_pb2.HttpBody(
                    content_type="application/octet-stream" if first else "", data=piece
                )
                first = False
                sent(len(piece))
            if first:  # an empty file is still one (empty) message
                yield httpbody_pb2.HttpBody(content_type="application/octet-stream")

        with path.open("rb") as handle:
            chunks = iter(lambda: handle.read(UPLOAD_PIECE_BYTES), b"")
            try:
                answer = self._uploads.UploadFile(pieces(chunks), metadata=self._metadata)
            except grpc.RpcError as error:
                raise from_rpc(error, self.target) from None
        return answer.file_path
