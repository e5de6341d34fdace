"""Instance-wide settings kept in the database."""

from __future__ import annotations

from sqlalchemy.dialects.postgresql import insert

from ingestion_grpc.auth.permissions import Principal
from ingestion_grpc.db.models import SystemSettings
from ingestion_grpc.db.session import UnitOfWork
from ingestion_grpc.domain import audit

_ROW_ID = 1


def ensure_settings(uow: UnitOfWork, enable_deletion_default: bool) -> None:
    """Create the settings row on first start; later starts keep what is stored."""
    uow.session.execute(
        insert(SystemSettings)
        .values(id=_ROW_ID, enable_deletion=enable_deletion_default)
        .on_conflict_do_nothing(index_elements=["id"])
    )


def get_settings(uow: UnitOfWork) -> SystemSettings:
    settings = uow.session.get(SystemSettings, _ROW_ID)
    if settings is None:
        raise RuntimeError("system settings row is missing; the server creates it on start")
    return settings


def update_settings(
    uow: UnitOfWork, principal: Principal, enable_deletion: bool | None
) -> SystemSettings:
    settings = get_settings(uow)
    if enable_deletion is not None and enable_deletion != settings.enable_deletion:
        audit.record(
            uow,
            principal,
            audit.Action.SETTINGS_UPDATE,
            audit.Target.SETTINGS,
            details={"enableDeletion": {"from": settings.enable_deletion, "to": enable_deletion}},
        )
        settings.enable_deletion = enable_deletion
    return settings
