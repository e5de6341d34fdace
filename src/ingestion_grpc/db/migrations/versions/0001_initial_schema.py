"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-29 10:22:34.387907
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "system_settings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("enable_deletion", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_system_settings")),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("email", name=op.f("uq_users_email")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("user_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_api_keys_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_index(op.f("ix_api_keys_user_id"), "api_keys", ["user_id"], unique=False)
    op.create_table(
        "ingestion_sources",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("owner_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("sealed_config", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_sync_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_sync_finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_sync_status_message", sa.Text(), nullable=False),
        sa.Column("run_requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_sync_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("consecutive_failures", sa.Integer(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_id"],
            ["users.id"],
            name=op.f("fk_ingestion_sources_owner_id_users"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingestion_sources")),
    )
    op.create_index(
        "ix_ingestion_sources_owner_created",
        "ingestion_sources",
        ["owner_id", "created_at"],
        unique=False,
    )
    op.create_table(
        "archived_emails",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("source_id", sa.String(length=36), nullable=False),
        sa.Column("mailbox", sa.Text(), nullable=False),
        sa.Column("folder_paths", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("provider_message_id", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("from_address", sa.Text(), nullable=False),
        sa.Column("to_addresses", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("cc_addresses", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("has_attachments", sa.Boolean(), nullable=False),
        sa.Column("archived_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["source_id"],
            ["ingestion_sources.id"],
            name=op.f("fk_archived_emails_source_id_ingestion_sources"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_archived_emails")),
        sa.UniqueConstraint("source_id", "mailbox", "sha256", name="uq_archived_emails_content"),
    )
    op.create_index("ix_archived_emails_sha256", "archived_emails", ["sha256"], unique=False)
    op.create_index(
        "ix_archived_emails_source_order",
        "archived_emails",
        ["source_id", "archived_at", "id"],
        unique=False,
    )
    op.create_table(
        "mailbox_cursors",
        sa.Column("source_id", sa.String(length=36), nullable=False),
        sa.Column("mailbox", sa.Text(), nullable=False),
        sa.Column("cursor", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["source_id"],
            ["ingestion_sources.id"],
            name=op.f("fk_mailbox_cursors_source_id_ingestion_sources"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("source_id", "mailbox", name=op.f("pk_mailbox_cursors")),
    )
    op.create_table(
        "sync_sessions",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("source_id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("listed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("mailboxes_total", sa.Integer(), nullable=False),
        sa.Column("mailboxes_done", sa.Integer(), nullable=False),
        sa.Column("mailboxes_failed", sa.Integer(), nullable=False),
        sa.Column("messages_fetched", sa.BigInteger(), nullable=False),
        sa.Column("messages_archived", sa.BigInteger(), nullable=False),
        sa.Column("messages_already_present", sa.BigInteger(), nullable=False),
        sa.Column("messages_failed", sa.BigInteger(), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["source_id"],
            ["ingestion_sources.id"],
            name=op.f("fk_sync_sessions_source_id_ingestion_sources"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_sessions")),
    )
    op.create_index(
        "ix_sync_sessions_source_started",
        "sync_sessions",
        ["source_id", "started_at"],
        unique=False,
    )
    op.create_table(
        "run_mailboxes",
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("mailbox", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("lease", sa.String(length=36), nullable=True),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["sync_sessions.id"],
            name=op.f("fk_run_mailboxes_run_id_sync_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "mailbox", name=op.f("pk_run_mailboxes")),
    )


def downgrade() -> None:
    op.drop_table("run_mailboxes")
    op.drop_index("ix_sync_sessions_source_started", table_name="sync_sessions")
    op.drop_table("sync_sessions")
    op.drop_table("mailbox_cursors")
    op.drop_index("ix_archived_emails_source_order", table_name="archived_emails")
    op.drop_index("ix_archived_emails_sha256", table_name="archived_emails")
    op.drop_table("archived_emails")
    op.drop_index("ix_ingestion_sources_owner_created", table_name="ingestion_sources")
    op.drop_table("ingestion_sources")
    op.drop_index(op.f("ix_api_keys_user_id"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("users")
    op.drop_table("system_settings")
