"""audit trail; uploads owned by their uploader and claimed by one source

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 06:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column(
            "occurred_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("clock_timestamp()"),
            nullable=False,
        ),
        sa.Column("actor_user_id", sa.String(length=36), nullable=True),
        sa.Column("actor_email", sa.String(length=320), nullable=False),
        sa.Column("actor_api_key_id", sa.String(length=36), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target_type", sa.String(length=32), nullable=False),
        sa.Column("target_id", sa.String(length=64), nullable=False),
        sa.Column("source_id", sa.String(length=36), nullable=True),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("details", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_index("ix_audit_events_order", "audit_events", ["occurred_at", "id"])
    for name, column in (
        ("ix_audit_events_source", "source_id"),
        ("ix_audit_events_action", "action"),
        ("ix_audit_events_actor", "actor_user_id"),
    ):
        op.create_index(name, "audit_events", [column, "occurred_at", "id"])
    # Files uploaded before this revision have no row: the sweep removes such a
    # file after UPLOAD_TTL only if no source's configuration names it.
    op.create_table(
        "uploads",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("owner_id", sa.String(length=36), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("source_id", sa.String(length=36), nullable=True),
        sa.ForeignKeyConstraint(
            ["owner_id"],
            ["users.id"],
            name=op.f("fk_uploads_owner_id_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["source_id"],
            ["ingestion_sources.id"],
            name=op.f("fk_uploads_source_id_ingestion_sources"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_uploads")),
        sa.UniqueConstraint("source_id", name=op.f("uq_uploads_source_id")),
    )
    op.create_index("ix_uploads_unused_created", "uploads", ["created_at", "source_id"])


def downgrade() -> None:
    op.drop_index("ix_uploads_unused_created", "uploads")
    op.drop_table("uploads")
    for name in (
        "ix_audit_events_actor",
        "ix_audit_events_action",
        "ix_audit_events_source",
        "ix_audit_events_order",
    ):
        op.drop_index(name, "audit_events")
    op.drop_table("audit_events")
