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
    _set_time(message.last_sync_started_at, source.last_sync_started_at)
    _set_time(message.last_sync_finished_at, source.last_sync_finished_at)
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


def _set_time(field: Timestamp, value: datetime | None) -> None:
    if value is not None:
        field.CopyFrom(timestamp(value))


def sync_session_to_proto(run: models.SyncSession) -> resources_pb2.SyncSession:
    message = resources_pb2.SyncSession(
        id=run.id,
        source_id=run.source_id,
        kind=run.kind,
        status=run.status,
        started_at=timestamp(run.started_at),
        mailboxes_total=run.mailboxes_total,
        mailboxes_done=run.mailboxes_done,
        mailboxes_failed=run.mailboxes_failed,
        messages_fetched=run.messages_fetched,
        messages_archived=run.messages_archived,
        messages_already_present=run.messages_already_present,
        messages_failed=run.messages_failed,
        messages_skipped=run.messages_skipped,
        mailboxes_skipped=run.mailboxes_skipped,
        error_message=run.error_message,
    )
    _set_time(message.finished_at, run.finished_at)
    return message


def run_mailbox_to_proto(row: models.RunMailbox) -> resources_pb2.SyncSessionMailbox:
    message = resources_pb2.SyncSessionMailbox(
        mailbox=row.mailbox,
        display_name=row.display_name or row.mailbox,
        state=row.state,
        messages_fetched=row.messages_fetched,
        messages_archived=row.messages_archived,
        messages_already_present=row.messages_already_present,
        messages_skipped=row.messages_skipped,
        messages_failed=row.messages_failed,
        error_message=row.error_message,
    )
    _set_time(message.updated_at, row.updated_at)
    return message


def archived_email_to_proto(email: models.ArchivedEmail) -> resources_pb2.ArchivedEmail:
    message = resources_pb2.ArchivedEmail(
        id=email.id,
        source_id=email.source_id,
        mailbox=email.mailbox,
        folder_paths=email.folder_paths,
        message_id=email.message_id,
        subject=email.subject,
        from_address=email.from_address,
        to=email.to_addresses,
        cc=email.cc_addresses,
        size_bytes=email.size_bytes,
        sha256=email.sha256,
        has_attachments=email.has_attachments,
        provider_message_id=email.provider_message_id,
        archived_at=timestamp(email.archived_at),
    )
    _set_time(message.sent_at, email.sent_at)
    return message
