"""First start: the admin is created once, with a generated password if none is given."""

from __future__ import annotations

from ingestion_grpc.auth.services import ensure_first_admin, login
from ingestion_grpc.bootstrap import login_throttle
from ingestion_grpc.config import Settings
from ingestion_grpc.server import RunningServer


def test_first_admin_only_when_there_are_no_users(
    grpc_server: RunningServer, settings: Settings
) -> None:
    with grpc_server.database.unit_of_work() as uow:
        assert ensure_first_admin(uow, "another@example.com", None) is None


def test_generated_password_works(database_url: str, settings: Settings) -> None:
    import uuid

    import psycopg

    from ingestion_grpc.db.migrate import upgrade_to_head
    from ingestion_grpc.db.session import Database
    from tests.support.services import POSTGRES_ADMIN_URL

    name = f"ingestion_first_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    database = Database(database_url.rsplit("/", 1)[0] + "/" + name)
    try:
        upgrade_to_head(database.engine)
        with database.unit_of_work() as uow:
            generated = ensure_first_admin(uow, "first@example.com", None)
            uow.commit()
        assert generated is not None and len(generated) >= 20
        with database.unit_of_work() as uow:
            token, user = login(
                uow,
                "first@example.com",
                generated,
                settings.jwt_secret,
                settings.jwt_expires_in,
                throttle=login_throttle(settings),
                client_address="127.0.0.1",
            )
        assert user.role == "admin" and token
    finally:
        database.dispose()
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
