"""tenant-ready engine: mailbox records and progress, skipped counters, lookups by provider id

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 03:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_MAILBOX_COUNTERS = (
    "messages_fetched",
    "messages_archived",
    "messages_already_present",
    "messages_skipped",
    "messages_failed",
)


def upgrade() -> None:
    op.add_column(
        "run_mailboxes", sa.Column("display_name", sa.Text(), nullable=False, server_default="")
    )
    op.execute("UPDATE run_mailboxes SET display_name = mailbox")
    for column in _MAILBOX_COUNTERS:
        op.add_column(
            "run_mailboxes",
            sa.Column(column, sa.BigInteger(), nullable=False, server_default="0"),
        )
    op.add_column("run_mailboxes", sa.Column("updated_at", sa.DateTime(timezone=True)))
    # NULL: pending, but not sent, because the source's cap on mailboxes running at
    # once is reached; sent when a place frees up.
    op.alter_column("run_mailboxes", "enqueued_at", nullable=True)
    op.create_index("ix_run_mailboxes_run_state", "run_mailboxes", ["run_id", "state"])
    for column in ("messages_skipped", "mailboxes_skipped"):
        op.add_column(
            "sync_sessions",
            sa.Column(column, sa.BigInteger(), nullable=False, server_default="0"),
        )
    # Set when the run's mailboxes are listed (from the provider and the source's
    # config), so that claims can enforce it without decrypting the config.
    op.add_column(
        "sync_sessions",
        sa.Column("max_concurrent_mailboxes", sa.Integer(), nullable=False, server_default="8"),
    )
    op.create_index(
        "ix_archived_emails_provider_id",
        "archived_emails",
        ["source_id", "mailbox", "provider_message_id"],
    )


def downgrade() -> None:
    op.drop_index("ix_archived_emails_provider_id", "archived_emails")
    op.drop_column("sync_sessions", "max_concurrent_mailboxes")
    for column in ("messages_skipped", "mailboxes_skipped"):
        op.drop_column("sync_sessions", column)
    op.drop_index("ix_run_mailboxes_run_state", "run_mailboxes")
    op.execute("UPDATE run_mailboxes SET enqueued_at = now() WHERE enqueued_at IS NULL")
    op.alter_column("run_mailboxes", "enqueued_at", nullable=False)
    op.drop_column("run_mailboxes", "updated_at")
    for column in _MAILBOX_COUNTERS:
        op.drop_column("run_mailboxes", column)
    op.drop_column("run_mailboxes", "display_name")
