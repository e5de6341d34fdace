"""The audit trail: who did what, written in the transaction of what it records.

The domain services call `record` next to the change itself, so an event exists
exactly when its change was committed, whichever entry point (REST, gRPC, the
CLI) asked. Details are built here from known, harmless values only: names,
providers, ids, the names (never the values) of changed fields. No password,
API key secret or `providerConfig` value ever reaches this table.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import select, tuple_

from ingestion_grpc.auth.permissions import Principal
from ingestion_grpc.db.models import AuditEvent
from ingestion_grpc.db.session import UnitOfWork
from ingestion_grpc.domain.paging import decode_token, encode_token, page_size
from ingestion_grpc.telemetry import context


class Action(StrEnum):
    SOURCE_CREATE = "source.create"
    SOURCE_UPDATE = "source.update"
    SOURCE_PAUSE = "source.pause"
    SOURCE_IMPORT = "source.import"
    SOURCE_SYNC = "source.sync"
    SOURCE_DELETE = "source.delete"
    API_KEY_CREATE = "api_key.create"
    API_KEY_REVOKE = "api_key.revoke"
    SETTINGS_UPDATE = "settings.update"
    UPLOAD_CREATE = "upload.create"
    ARCHIVED_EMAIL_DOWNLOAD = "archived_email.download"
    LOGIN_FAILED = "auth.login_failed"


class Target(StrEnum):
    SOURCE = "ingestion_source"
    API_KEY = "api_key"
    SETTINGS = "system_settings"
    UPLOAD = "upload"
    ARCHIVED_EMAIL = "archived_email"
    USER = "user"


# Longest values kept of what a client chose (an email tried at sign-in).
_MAX_EMAIL = 320
_MAX_REQUEST_ID = 128


def record(
    uow: UnitOfWork,
    principal: Principal,
    action: Action,
    target: Target,
    target_id: str = "",
    *,
    source_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Add the event of an authenticated caller's action to the unit of work."""
    _add(
        uow,
        AuditEvent(
            actor_user_id=principal.user_id,
            actor_email=principal.email,
            actor_api_key_id=principal.api_key_id,
            action=action,
            target_type=target,
            target_id=target_id,
            source_id=source_id,
            details=details or {},
        ),
    )


def record_failed_login(
    uow: UnitOfWork, email_tried: str, user_id: str | None, details: dict[str, Any]
) -> None:
    """A refused sign-in: the email tried (never the password), why, and from where."""
    _add(
        uow,
        AuditEvent(
            actor_user_id=user_id,
            actor_email=email_tried[:_MAX_EMAIL],
            action=Action.LOGIN_FAILED,
            target_type=Target.USER,
            target_id=user_id or "",
            details=details,
        ),
    )


def _add(uow: UnitOfWork, event: AuditEvent) -> None:
    event.request_id = context.current().get("request_id", "")[:_MAX_REQUEST_ID]
    uow.session.add(event)


def list_events(
    uow: UnitOfWork,
    size: int,
    token: str,
    *,
    source_id: str = "",
    action: str = "",
    actor_user_id: str = "",
) -> tuple[list[AuditEvent], str]:
    """One page of events, newest first, and the token of the next ("" at the end)."""
    limit = page_size(size, default=100, maximum=1000)
    query = select(AuditEvent)
    if source_id:
        query = query.where(AuditEvent.source_id == source_id)
    if action:
        query = query.where(AuditEvent.action == action)
    if actor_user_id:
        query = query.where(AuditEvent.actor_user_id == actor_user_id)
    after = decode_token(token)
    if after is not None:
        query = query.where(tuple_(AuditEvent.occurred_at, AuditEvent.id) < tuple_(*after))
    events = list(
        uow.session.scalars(
            query.order_by(AuditEvent.occurred_at.desc(), AuditEvent.id.desc()).limit(limit + 1)
        )
    )
    if len(events) <= limit:
        return events, ""
    events = events[:limit]
    return events, encode_token(events[-1].occurred_at, events[-1].id)
