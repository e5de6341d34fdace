"""Shared pytest fixtures. Each lives in tests/support/; register it here by import."""

from tests.support.cloud import fake_google, fake_graph
from tests.support.dovecot import dovecot
from tests.support.envoy import envoy_factory
from tests.support.s3 import s3, s3_archive
from tests.support.services import (
    admin,
    database_url,
    environment,
    grpc_channel,
    grpc_server,
    make_client,
    queue_namespace,
    rest_url,
    settings,
)
from tests.support.stacks import s3_deployment, stack
from tests.support.workers import engine, start_worker

__all__ = [
    "admin",
    "database_url",
    "dovecot",
    "engine",
    "environment",
    "envoy_factory",
    "fake_google",
    "fake_graph",
    "grpc_channel",
    "grpc_server",
    "make_client",
    "queue_namespace",
    "rest_url",
    "s3",
    "s3_archive",
    "s3_deployment",
    "settings",
    "stack",
    "start_worker",
]
