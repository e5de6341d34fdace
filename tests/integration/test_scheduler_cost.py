"""The scheduler's cost does not grow with the number of sources: one tick is the same
small number of SQL statements with 100 sources as with 10,000, whether they are
all due for a sync or all mid-sync with mailboxes waiting for a place under their
run's cap. Counted with a SQLAlchemy event listener on the real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import event, text

from ingestion_grpc import bootstrap
from ingestion_grpc.archive.blobstore import LocalBlobStore
from ingestion_grpc.config import Settings
from ingestion_grpc.crypto import CredentialCipher
from ingestion_grpc.db.migrate import upgrade_to_head
from ingestion_grpc.db.session import Database
from ingestion_grpc.domain.lifecycle import JobQueue, RunKind
from ingestion_grpc.engine import scheduler
from ingestion_grpc.engine.context import EngineContext
from tests.support.fetch_context import LocalLimiter
from tests.support.services import POSTGRES_ADMIN_URL

# A tick's statements: claiming due syncs, reviving lost runs, closing complete
# ones, reviving lost mailboxes, filling free places. None of them per source.
MOST_STATEMENTS_A_TICK = 12


class SentJobs(JobQueue):
    """The jobs a tick sends; the queue looks empty, so every watchdog check runs."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, RunKind]] = []
        self.mailboxes: list[tuple[str, str]] = []

    def enqueue_run(self, source_id: str, kind: RunKind) -> None:
        self.runs.append((source_id, kind))

    def enqueue_mailbox(self, run_id: str, mailbox: str) -> None:
        self.mailboxes.append((run_id, mailbox))

    def backlog(self) -> int:
        return 0

    def ping(self) -> None:
        pass


@contextmanager
def engine_on_a_new_database(settings: Settings, tmp: Any) -> Iterator[EngineContext]:
    """The scheduler's context on a database of its own: a tick claims every due
    source in the database, so it must not see other tests' sources."""
    name = f"ingestion_cost_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    database = Database(f"{base}/{name}")
    try:
        upgrade_to_head(database.engine)
        yield EngineContext(
            database=database,
            cipher=CredentialCipher(settings.encryption_key),
            blobs=LocalBlobStore(tmp / "blobs"),
            jobs=SentJobs(),
            limits=LocalLimiter(()),
            sync_interval=timedelta(minutes=5),
            stale_after=timedelta(minutes=2),
            provider_environment=bootstrap.provider_environment(settings),
        )
    finally:
        database.dispose()
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def add_sources(ctx: EngineContext, count: int, status: str) -> None:
    """`count` IMAP sources (a provider the scheduler syncs), never synced yet."""
    with ctx.database.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO users (id, email, password_hash, role, created_at) "
                "VALUES ('owner', 'owner@example.com', 'x', 'admin', now())"
            )
        )
        connection.execute(
            text(
                "INSERT INTO ingestion_sources (id, owner_id, name, provider, status, "
                "sealed_config, created_at, updated_at, last_sync_status_message, "
                "consecutive_failures, run_requested_at) "
                "SELECT 's' || n, 'owner', 'source ' || n, 'generic_imap', :status, "
                "'\\x00'::bytea, now(), now(), '', 0, now() FROM generate_series(1, :count) n"
            ),
            {"status": status, "count": count},
        )


def add_runs_waiting_for_a_place(ctx: EngineContext) -> None:
    """Every source mid-sync: its run listed, cap 2, mailbox a running (heartbeat
    fresh), b and c pending and not sent: one place free for each run."""
    with ctx.database.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO sync_sessions (id, source_id, kind, status, started_at, "
                "heartbeat_at, listed_at, mailboxes_total, mailboxes_done, mailboxes_failed, "
                "messages_fetched, messages_archived, messages_already_present, "
                "messages_failed, messages_skipped, mailboxes_skipped, "
                "max_concurrent_mailboxes, error_message) "
                "SELECT 'r' || id, id, 'sync', 'running', now(), now(), now(), 3, 0, 0, "
                "0, 0, 0, 0, 0, 0, 2, '' FROM ingestion_sources"
            )
        )
        connection.execute(
            text(
                "INSERT INTO run_mailboxes (run_id, mailbox, display_name, state, "
                "enqueued_at, heartbeat_at, error_message, messages_fetched, "
                "messages_archived, messages_already_present, messages_skipped, "
                "messages_failed, updated_at) "
                "SELECT r.id, m.name, m.name, m.state, "
                "CASE WHEN m.state = 'running' THEN now() END, "
                "CASE WHEN m.state = 'running' THEN now() END, '', 0, 0, 0, 0, 0, now() "
                "FROM sync_sessions r CROSS JOIN (VALUES ('a', 'running'), "
                "('b', 'pending'), ('c', 'pending')) AS m(name, state)"
            )
        )


def statements_of_one_tick(ctx: EngineContext) -> int:
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    event.listen(ctx.database.engine, "before_cursor_execute", count)
    try:
        scheduler.tick(ctx)
    finally:
        event.remove(ctx.database.engine, "before_cursor_execute", count)
    return len(statements)


def sent(ctx: EngineContext) -> SentJobs:
    assert isinstance(ctx.jobs, SentJobs)
    return ctx.jobs


def tick_with_every_source_due(settings: Settings, tmp: Any, sources: int) -> int:
    with engine_on_a_new_database(settings, tmp) as ctx:
        add_sources(ctx, sources, "active")
        statements = statements_of_one_tick(ctx)
        assert sorted(sent(ctx).runs) == sorted(
            (f"s{n}", RunKind.SYNC) for n in range(1, sources + 1)
        )
        with ctx.database.engine.connect() as connection:
            runs = connection.execute(
                text(
                    "SELECT count(*), count(DISTINCT source_id) FROM sync_sessions "
                    "WHERE kind = 'sync' AND status = 'running'"
                )
            ).one()
            syncing = connection.scalar(
                text(
                    "SELECT count(*) FROM ingestion_sources WHERE status = 'syncing' "
                    "AND next_sync_at > now() AND last_sync_started_at IS NOT NULL"
                )
            )
        assert tuple(runs) == (sources, sources)
        assert syncing == sources
        return statements


def tick_with_every_run_waiting(settings: Settings, tmp: Any, sources: int) -> int:
    with engine_on_a_new_database(settings, tmp) as ctx:
        add_sources(ctx, sources, "syncing")
        add_runs_waiting_for_a_place(ctx)
        statements = statements_of_one_tick(ctx)
        # One place free in each run: its first waiting mailbox, b, is sent.
        assert sorted(sent(ctx).mailboxes) == sorted((f"rs{n}", "b") for n in range(1, sources + 1))
        assert sent(ctx).runs == []
        return statements


@pytest.mark.parametrize(
    "tick", [tick_with_every_source_due, tick_with_every_run_waiting], ids=["due", "waiting"]
)
def test_one_tick_costs_the_same_few_statements_for_100_and_10000_sources(
    settings: Settings, tmp_path: Any, tick: Any
) -> None:
    few = tick(settings, tmp_path, 100)
    many = tick(settings, tmp_path, 10_000)
    assert (few, many) == (few, few)
    assert few <= MOST_STATEMENTS_A_TICK
