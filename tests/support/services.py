"""Fixtures for the real backing services: a fresh PostgreSQL database, a Redis
namespace of our own, and the gRPC server running in this process."""

from __future__ import annotations

import contextlib
import os
import secrets
import uuid
from collections.abc import Callable, Iterator

import grpc
import psycopg
import pytest
import redis

from ingestion_grpc import bootstrap
from ingestion_grpc.auth.permissions import Role
from ingestion_grpc.auth.services import create_user
from ingestion_grpc.config import Settings
from ingestion_grpc.server import RunningServer, start_server
from tests.support.fake_google import FakeGoogle
from tests.support.fake_graph import FakeGraph
from tests.support.rest import Rest, unique_email

ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "admin-password-for-tests"
POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _database_url(name: str) -> str:
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


@contextlib.contextmanager
def new_database() -> Iterator[str]:
    """A new, empty database; dropped on exit."""
    name = f"ingestion_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _database_url(name)
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def new_queue_namespace() -> Iterator[str]:
    """A Dramatiq namespace of its own; its keys are removed on exit."""
    namespace = f"ingestion-test-{uuid.uuid4().hex[:12]}"
    try:
        yield namespace
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"{namespace}:*"):
            client.delete(key)
        client.close()


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A database of this test run's own, dropped at the end."""
    with new_database() as url:
        yield url


@pytest.fixture(scope="session")
def queue_namespace() -> Iterator[str]:
    """A Dramatiq namespace of this test run's own; its keys are removed after."""
    with new_queue_namespace() as namespace:
        yield namespace


@pytest.fixture(scope="session")
def environment(
    database_url: str,
    queue_namespace: str,
    tmp_path_factory: pytest.TempPathFactory,
    fake_google: FakeGoogle,
    fake_graph: FakeGraph,
) -> dict[str, str]:
    """The environment of this run's server, workers and scheduler."""
    return {
        "DATA_DIR": str(tmp_path_factory.mktemp("data")),
        "DATABASE_URL": database_url,
        "REDIS_URL": REDIS_URL,
        "QUEUE_NAMESPACE": queue_namespace,
        "JWT_SECRET": secrets.token_urlsafe(32),
        "ENCRYPTION_KEY": secrets.token_hex(32),
        "GRPC_PORT": "0",
        # Short, so that tests of crash recovery need not wait minutes.
        "STALE_RUN_AFTER": "3s",
        "ADMIN_EMAIL": ADMIN_EMAIL,
        "ADMIN_PASSWORD": ADMIN_PASSWORD,
        # The test-only tenant provider (tests/support/fake_tenant.py), in the
        # server of this process and in every worker the tests start.
        "PROVIDER_PLUGINS": "tests.support.fake_tenant:FakeTenant",
        "GOOGLE_API_ENDPOINT": fake_google.url,
        "MICROSOFT_AUTHORITY_HOST": fake_graph.url,
        "MICROSOFT_GRAPH_ENDPOINT": fake_graph.url,
        "REQUESTS_CA_BUNDLE": str(fake_graph.ca_path),
    }


@pytest.fixture(scope="session")
def settings(environment: dict[str, str]) -> Settings:
    return bootstrap.load_settings(environment)


@pytest.fixture(scope="session")
def grpc_server(settings: Settings) -> Iterator[RunningServer]:
    running = start_server(settings, port=0, jobs=bootstrap.job_queue(settings))
    yield running
    running.stop(grace=1)


@pytest.fixture(scope="session")
def rest_url(grpc_server: RunningServer, envoy_factory: Callable[..., str]) -> str:
    """Envoy in front of the test server: REST, native gRPC and `GET /metrics` on one port."""
    return envoy_factory(grpc_server.port, grpc_server.metrics_port)


@pytest.fixture(scope="session")
def admin(rest_url: str) -> Rest:
    return Rest(rest_url).login(ADMIN_EMAIL, ADMIN_PASSWORD)


def client_maker(server: RunningServer, rest_url: str) -> Callable[[str], Rest]:
    """`make(role)`: a new user of `server` with that role, signed in over REST."""

    def make(role: str) -> Rest:
        email = unique_email(role)
        password = secrets.token_urlsafe(12)
        with server.database.unit_of_work() as uow:
            create_user(uow, email, password, Role(role))
            uow.commit()
        client = Rest(rest_url).login(email, password)
        client.email = email
        return client

    return make


@pytest.fixture(scope="session")
def make_client(grpc_server: RunningServer, rest_url: str) -> Callable[[str], Rest]:
    """`make_client(role)`: a new user with that role, signed in over REST."""
    return client_maker(grpc_server, rest_url)


@pytest.fixture(params=["direct", "envoy"])
def grpc_channel(
    request: pytest.FixtureRequest, grpc_server: RunningServer, rest_url: str
) -> Iterator[grpc.Channel]:
    """A native gRPC channel, to the server's own port and through Envoy."""
    target = (
        f"127.0.0.1:{grpc_server.port}"
        if request.param == "direct"
        else rest_url.removeprefix("http://")
    )
    with grpc.insecure_channel(target) as channel:
        yield channel
