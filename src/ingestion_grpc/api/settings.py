"""SettingsService."""

from __future__ import annotations

import grpc
from ingestion.v1 import settings_service_pb2 as pb
from ingestion.v1 import settings_service_pb2_grpc

from ingestion_grpc.api.interceptors import current_principal
from ingestion_grpc.db.session import Database
from ingestion_grpc.domain import settings


class SettingsServicer(settings_service_pb2_grpc.SettingsServiceServicer):
    def __init__(self, database: Database) -> None:
        self._database = database

    def GetSystemSettings(
        self, request: pb.GetSystemSettingsRequest, context: grpc.ServicerContext
    ) -> pb.SystemSettings:
        with self._database.unit_of_work() as uow:
            return pb.SystemSettings(enable_deletion=settings.get_settings(uow).enable_deletion)

    def UpdateSystemSettings(
        self, request: pb.UpdateSystemSettingsRequest, context: grpc.ServicerContext
    ) -> pb.SystemSettings:
        enable_deletion = request.enable_deletion if request.HasField("enable_deletion") else None
        with self._database.unit_of_work() as uow:
            updated = settings.update_settings(uow, current_principal(), enable_deletion)
            uow.commit()
            return pb.SystemSettings(enable_deletion=updated.enable_deletion)
