"""Tables. Ids are random UUIDs as text; timestamps are timezone-aware UTC."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    # SHA-256 of the secret: keys are 256-bit random, so a fast hash is enough
    # and lets a request find its key with one indexed lookup.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class IngestionSource(Base):
    __tablename__ = "ingestion_sources"
    __table_args__ = (Index("ix_ingestion_sources_owner_created", "owner_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    name: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(32))
    # AES-256-GCM sealed JSON (see crypto.CredentialCipher), bound to `id`.
    sealed_config: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
    last_sync_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_sync_finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_sync_status_message: Mapped[str] = mapped_column(Text, default="")
    # When the latest run was claimed: the watchdog re-sends a claimed run
    # whose job never reached a worker.
    run_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the scheduler next syncs the source; pushed back after failures.
    next_sync_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class SystemSettings(Base):
    """A single row (id 1), created from ENABLE_DELETION on first start."""

    __tablename__ = "system_settings"

    id: Mapped[int] = mapped_column(primary_key=True)
    enable_deletion: Mapped[bool] = mapped_column(Boolean)


class SyncSession(Base):
    """One import or sync run of a source, with the counters a progress bar reads."""

    __tablename__ = "sync_sessions"
    __table_args__ = (Index("ix_sync_sessions_source_started", "source_id", "started_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    source_id: Mapped[str] = mapped_column(ForeignKey("ingestion_sources.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    # running -> completed | failed; paused while its source is paused.
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Set once the run's mailboxes are listed: before that, "no mailbox left
    # to do" does not mean "finished".
    listed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    mailboxes_total: Mapped[int] = mapped_column(Integer, default=0)
    mailboxes_done: Mapped[int] = mapped_column(Integer, default=0)
    mailboxes_failed: Mapped[int] = mapped_column(Integer, default=0)
    messages_fetched: Mapped[int] = mapped_column(BigInteger, default=0)
    messages_archived: Mapped[int] = mapped_column(BigInteger, default=0)
    messages_already_present: Mapped[int] = mapped_column(BigInteger, default=0)
    messages_failed: Mapped[int] = mapped_column(BigInteger, default=0)
    messages_skipped: Mapped[int] = mapped_column(BigInteger, default=0)
    mailboxes_skipped: Mapped[int] = mapped_column(BigInteger, default=0)
    # How many of its mailboxes may run at once (the provider's default or the
    # source's `maxConcurrentMailboxes`), fixed when they are listed.
    max_concurrent_mailboxes: Mapped[int] = mapped_column(Integer, default=8)
    error_message: Mapped[str] = mapped_column(Text, default="")


class RunMailbox(Base):
    """One mailbox's share of a run: the unit a worker claims, and its progress."""

    __tablename__ = "run_mailboxes"
    __table_args__ = (Index("ix_run_mailboxes_run_state", "run_id", "state"),)

    run_id: Mapped[str] = mapped_column(
        ForeignKey("sync_sessions.id", ondelete="CASCADE"), primary_key=True
    )
    # The provider's stable id of the mailbox (a user's object id, an IMAP username).
    mailbox: Mapped[str] = mapped_column(Text, primary_key=True)
    # What an admin reads: an email address, a UPN, a file name.
    display_name: Mapped[str] = mapped_column(Text, default="")
    # See domain.lifecycle.MailboxState.
    state: Mapped[str] = mapped_column(String(16))
    # Changes on every claim: a worker whose lease was taken over stops.
    lease: Mapped[str | None] = mapped_column(String(36))
    # When its job was sent; None while it waits for a place under the source's cap.
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Why it failed, or why it was skipped.
    error_message: Mapped[str] = mapped_column(Text, default="")
    messages_fetched: Mapped[int] = mapped_column(BigInteger, default=0)
    messages_archived: Mapped[int] = mapped_column(BigInteger, default=0)
    messages_already_present: Mapped[int] = mapped_column(BigInteger, default=0)
    messages_skipped: Mapped[int] = mapped_column(BigInteger, default=0)
    messages_failed: Mapped[int] = mapped_column(BigInteger, default=0)
    # When it last reported (claimed, a batch archived, ended).
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class MailboxCursor(Base):
    """Where the next run of one mailbox of a source starts."""

    __tablename__ = "mailbox_cursors"

    source_id: Mapped[str] = mapped_column(
        ForeignKey("ingestion_sources.id", ondelete="CASCADE"), primary_key=True
    )
    mailbox: Mapped[str] = mapped_column(Text, primary_key=True)
    cursor: Mapped[dict[str, Any]] = mapped_column(JSONB)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class ArchivedEmail(Base):
    """Metadata of one archived message; its bytes are the blob named by sha256.

    Unique per (source, mailbox, sha256): the same bytes seen again, in another
    folder or another run, add a folder path instead of a second row.
    """

    __tablename__ = "archived_emails"
    __table_args__ = (
        UniqueConstraint("source_id", "mailbox", "sha256", name="uq_archived_emails_content"),
        Index("ix_archived_emails_source_order", "source_id", "archived_at", "id"),
        Index("ix_archived_emails_sha256", "sha256"),
        # Providers ask which of their message ids a mailbox holds already.
        Index("ix_archived_emails_provider_id", "source_id", "mailbox", "provider_message_id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    source_id: Mapped[str] = mapped_column(ForeignKey("ingestion_sources.id", ondelete="CASCADE"))
    mailbox: Mapped[str] = mapped_column(Text)
    folder_paths: Mapped[list[str]] = mapped_column(ARRAY(Text))
    provider_message_id: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    message_id: Mapped[str] = mapped_column(Text)
    subject: Mapped[str] = mapped_column(Text)
    from_address: Mapped[str] = mapped_column(Text)
    to_addresses: Mapped[list[str]] = mapped_column(ARRAY(Text))
    cc_addresses: Mapped[list[str]] = mapped_column(ARRAY(Text))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    has_attachments: Mapped[bool] = mapped_column(Boolean)
    archived_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
