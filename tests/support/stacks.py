"""The service as an end-to-end test uses it, with either archive: the session's
own stack (blobs under DATA_DIR) or one that keeps blobs in S3.

A test asks for `stack` and runs with the local archive; parametrized with
`@pytest.mark.parametrize("stack", ["local", "s3"], indirect=True)` it runs once
more against a second server, Envoy, database and queue namespace whose
ARCHIVE_URL is a bucket on the session's S3-protocol server (tests/support/s3.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ingestion_grpc import bootstrap
from ingestion_grpc.config import Settings
from ingestion_grpc.engine.context import EngineContext
from ingestion_grpc.server import start_server
from tests.support.rest import Rest
from tests.support.s3 import S3Server, credentials_in_environment
from tests.support.services import client_maker, new_database, new_queue_namespace
from tests.support.workers import Worker, worker_starter


@dataclass(frozen=True)
class Deployment:
    """What lives for the session: the settings, the engine (for `tick`), and a way
    to make users of its server signed in through its Envoy."""

    environment: dict[str, str]
    settings: Settings
    engine: EngineContext
    make_client: Callable[[str], Rest]


@dataclass(frozen=True)
class Stack(Deployment):
    """A deployment and this test's worker processes."""

    archive: str
    start_worker: Callable[[], Worker]


@pytest.fixture(scope="session")
def s3_deployment(
    environment: dict[str, str],
    s3: S3Server,
    envoy_factory: Callable[..., str],
) -> Iterator[Deployment]:
    """The service with ARCHIVE_URL on a bucket of its own (and its own database
    and queue namespace, so that no worker of the other stack takes its jobs)."""
    archive = s3.new_archive()
    with new_database() as database_url, new_queue_namespace() as namespace:
        env = {
            **environment,
            **archive.environment,
            "DATABASE_URL": database_url,
            "QUEUE_NAMESPACE": namespace,
        }
        # boto3 in this process (the server, the engine) reads the same chain.
        with credentials_in_environment():
            settings = bootstrap.load_settings(env)
            server = start_server(settings, port=0, jobs=bootstrap.job_queue(settings))
            engine = bootstrap.engine_context(settings, bootstrap.job_queue(settings))
        try:
            rest_url = envoy_factory(server.port, server.metrics_port)
            yield Deployment(env, settings, engine, client_maker(server, rest_url))
        finally:
            server.stop(grace=1)
            engine.database.dispose()


@pytest.fixture
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """The local-archive stack, or (parametrized "s3") the S3 one."""
    archive = getattr(request, "param", "local")
    if archive == "s3":
        deployment: Deployment = request.getfixturevalue("s3_deployment")
    else:
        deployment = Deployment(
            request.getfixturevalue("environment"),
            request.getfixturevalue("settings"),
            request.getfixturevalue("engine"),
            request.getfixturevalue("make_client"),
        )
    with worker_starter(deployment.environment, tmp_path) as start:
        yield Stack(
            deployment.environment,
            deployment.settings,
            deployment.engine,
            deployment.make_client,
            archive,
            start,
        )
