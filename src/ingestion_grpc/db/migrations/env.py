"""Alembic environment: run against the connection `db.migrate` hands over."""

from __future__ import annotations

from alembic import context

from ingestion_grpc.db.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
