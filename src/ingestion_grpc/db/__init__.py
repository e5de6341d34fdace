"""Persistence: ORM models, the unit of work, and Alembic migrations."""
