"""IngestionService: proto in, domain call, proto out."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf import empty_pb2, json_format
from ingestion.v1 import ingestion_service_pb2 as pb
from ingestion.v1 import ingestion_service_pb2_grpc, resources_pb2

from ingestion_grpc.api.http import HttpStatus, set_http_status
from ingestion_grpc.api.interceptors import current_principal
from ingestion_grpc.api.mapping import (
    run_mailbox_to_proto,
    source_to_proto,
    sync_session_to_proto,
)
from ingestion_grpc.db.session import Database, retry_on_conflict
from ingestion_grpc.domain.lifecycle import RunKind
from ingestion_grpc.domain.sources import SourceChanges, SourceService

ACCEPTED_MESSAGE = "Operation completed successfully."


def _struct(request: Any, field: str) -> dict[str, Any] | None:
    if not request.HasField(field):
        return None
    return json_format.MessageToDict(getattr(request, field))


def _optional(request: Any, field: str) -> str | None:
    return getattr(request, field) if request.HasField(field) else None


class IngestionServicer(ingestion_service_pb2_grpc.IngestionServiceServicer):
    def __init__(self, database: Database, sources: SourceService) -> None:
        self._database = database
        self._sources = sources

    def CreateIngestionSource(
        self, request: pb.CreateIngestionSourceRequest, context: grpc.ServicerContext
    ) -> resources_pb2.IngestionSource:
        with self._database.unit_of_work() as uow:
            source = self._sources.create(
                uow,
                current_principal(),
                name=request.name,
                provider=request.provider,
                provider_config=_struct(request, "provider_config"),
            )
            uow.commit()
        set_http_status(context, HttpStatus.CREATED)
        return source_to_proto(source)

    def ListIngestionSources(
        self, request: pb.ListIngestionSourcesRequest, context: grpc.ServicerContext
    ) -> Iterator[resources_pb2.IngestionSource]:
        # The whole list is read before the first message is sent, so an
        # error can still become a proper status.
        with self._database.unit_of_work() as uow:
            messages = [
                source_to_proto(s) for s in self._sources.list_visible(uow, current_principal())
            ]
        yield from messages

    def GetIngestionSource(
        self, request: pb.GetIngestionSourceRequest, context: grpc.ServicerContext
    ) -> resources_pb2.IngestionSource:
        with self._database.unit_of_work() as uow:
            return source_to_proto(self._sources.get(uow, current_principal(), request.id))

    @retry_on_conflict
    def UpdateIngestionSource(
        self, request: pb.UpdateIngestionSourceRequest, context: grpc.ServicerContext
    ) -> resources_pb2.IngestionSource:
        changes = SourceChanges(
            name=_optional(request, "name"),
            provider=_optional(request, "provider"),
            status=_optional(request, "status"),
            provider_config=_struct(request, "provider_config"),
        )
        with self._database.unit_of_work() as uow:
            source = self._sources.update(uow, current_principal(), request.id, changes)
            uow.commit()
        return source_to_proto(source)

    @retry_on_conflict
    def DeleteIngestionSource(
        self, request: pb.DeleteIngestionSourceRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        with self._database.unit_of_work() as uow:
            self._sources.delete(uow, current_principal(), request.id)
            uow.commit()
        set_http_status(context, HttpStatus.NO_CONTENT)
        return empty_pb2.Empty()

    def TriggerInitialImport(
        self, request: pb.TriggerInitialImportRequest, context: grpc.ServicerContext
    ) -> pb.OperationAcceptedResponse:
        return self._start_run(request.id, RunKind.IMPORT, context)

    @retry_on_conflict
    def PauseIngestionSource(
        self, request: pb.PauseIngestionSourceRequest, context: grpc.ServicerContext
    ) -> resources_pb2.IngestionSource:
        with self._database.unit_of_work() as uow:
            source = self._sources.pause(uow, current_principal(), request.id)
            uow.commit()
        return source_to_proto(source)

    def ForceSync(
        self, request: pb.ForceSyncRequest, context: grpc.ServicerContext
    ) -> pb.OperationAcceptedResponse:
        return self._start_run(request.id, RunKind.SYNC, context)

    def _start_run(
        self, source_id: str, kind: RunKind, context: grpc.ServicerContext
    ) -> pb.OperationAcceptedResponse:
        with self._database.unit_of_work() as uow:
            run = self._sources.start_run(uow, current_principal(), source_id, kind)
            uow.commit()
        set_http_status(context, HttpStatus.ACCEPTED)
        return pb.OperationAcceptedResponse(message=ACCEPTED_MESSAGE, sync_session_id=run.id)

    def ListSyncSessions(
        self, request: pb.ListSyncSessionsRequest, context: grpc.ServicerContext
    ) -> pb.ListSyncSessionsResponse:
        with self._database.unit_of_work() as uow:
            runs, next_token = self._sources.sync_sessions(
                uow, current_principal(), request.id, request.page_size, request.page_token
            )
            return pb.ListSyncSessionsResponse(
                sync_sessions=[sync_session_to_proto(r) for r in runs],
                next_page_token=next_token,
            )

    def ListSyncSessionMailboxes(
        self, request: pb.ListSyncSessionMailboxesRequest, context: grpc.ServicerContext
    ) -> pb.ListSyncSessionMailboxesResponse:
        with self._database.unit_of_work() as uow:
            rows, next_token = self._sources.run_mailboxes(
                uow,
                current_principal(),
                request.id,
                request.session_id,
                request.page_size,
                request.page_token,
            )
            return pb.ListSyncSessionMailboxesResponse(
                mailboxes=[run_mailbox_to_proto(r) for r in rows], next_page_token=next_token
            )
