"""Database rows -> proto messages. Credentials have no field to land in."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp
from ingestion.v1 import resources_pb2

from ingestion_grpc.db import models


def timestamp(value: datetime) -> Timestamp:
    result = Timestamp()
    result.FromDatetime(value)
    return result


def source_to_proto(source: models.IngestionSource) -> resources_pb2.IngestionSource:
    message = resources_pb2.IngestionSource(
        id=source.id,
        name=source.name,
        provider=source.provider,
        status=source.status,
        created_at=timestamp(source.created_at),
        updated_at=timestamp(source.updated_at),
        last_sync_status_message=source.last_sync_status_message,
    )
    if source.last_sync_started_at is not None:
        message.last_sync_started_at.CopyFrom(timestamp(source.last_sync_started_at))
    if source.last_sync_finished_at is not None:
        message.last_sync_finished_at.CopyFrom(timestamp(source.last_sync_finished_at))
    return message


def user_to_proto(user: models.User) -> resources_pb2.User:
    return resources_pb2.User(id=user.id, email=user.email, role=user.role)


def api_key_to_proto(key: models.ApiKey, secret: str | None = None) -> resources_pb2.ApiKey:
    message = resources_pb2.ApiKey(
        id=key.id,
        name=key.name,
        expires_at=timestamp(key.expires_at),
        created_at=timestamp(key.created_at),
    )
    if secret is not None:
        message.key = secret
    return message
