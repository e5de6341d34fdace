"""AuditService: the audit trail, for admins."""

from __future__ import annotations

import grpc
from google.protobuf import struct_pb2
from ingestion.v1 import audit_service_pb2 as pb
from ingestion.v1 import audit_service_pb2_grpc

from ingestion_grpc.api.mapping import timestamp
from ingestion_grpc.db import models
from ingestion_grpc.db.session import Database
from ingestion_grpc.domain import audit


def audit_event_to_proto(event: models.AuditEvent) -> pb.AuditEvent:
    details = struct_pb2.Struct()
    details.update(event.details)
    return pb.AuditEvent(
        id=event.id,
        occurred_at=timestamp(event.occurred_at),
        actor=pb.AuditActor(
            user_id=event.actor_user_id or "",
            email=event.actor_email,
            api_key_id=event.actor_api_key_id or "",
        ),
        action=event.action,
        target_type=event.target_type,
        target_id=event.target_id,
        source_id=event.source_id or "",
        request_id=event.request_id,
        details=details,
    )


class AuditServicer(audit_service_pb2_grpc.AuditServiceServicer):
    def __init__(self, database: Database) -> None:
        self._database = database

    def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: grpc.ServicerContext
    ) -> pb.ListAuditEventsResponse:
        with self._database.unit_of_work() as uow:
            events, next_token = audit.list_events(
                uow,
                request.page_size,
                request.page_token,
                source_id=request.source_id,
                action=request.action,
                actor_user_id=request.actor_user_id,
            )
            return pb.ListAuditEventsResponse(
                audit_events=[audit_event_to_proto(e) for e in events],
                next_page_token=next_token,
            )
