"""Permissions, the roles that hold them, and the authenticated caller."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Permission(StrEnum):
    CREATE_INGESTION = "create:ingestion"
    READ_INGESTION = "read:ingestion"
    UPDATE_INGESTION = "update:ingestion"
    DELETE_INGESTION = "delete:ingestion"
    SYNC_INGESTION = "sync:ingestion"
    READ_ARCHIVE = "read:archive"
    MANAGE_SETTINGS = "manage:settings"
    READ_AUDIT = "read:audit"


class Role(StrEnum):
    ADMIN = "admin"
    USER = "user"
    VIEWER = "viewer"


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.ADMIN: frozenset(Permission),
    Role.USER: frozenset(Permission) - {Permission.MANAGE_SETTINGS, Permission.READ_AUDIT},
    Role.VIEWER: frozenset({Permission.READ_INGESTION, Permission.READ_ARCHIVE}),
}


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    user_id: str
    email: str
    role: Role
    # The API key the request came with; None for a signed-in user's token.
    api_key_id: str | None = None

    @property
    def permissions(self) -> frozenset[Permission]:
        return ROLE_PERMISSIONS[self.role]

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    @property
    def sees_all_sources(self) -> bool:
        """Admins act on every source, and viewers (auditors) read every source;
        users see and act only on their own."""
        return self.role in (Role.ADMIN, Role.VIEWER)
