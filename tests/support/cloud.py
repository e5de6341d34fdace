"""The local fakes of Google's and Microsoft's APIs, one each for the whole test run,
which the run's server and workers reach through GOOGLE_API_ENDPOINT and
MICROSOFT_AUTHORITY_HOST / MICROSOFT_GRAPH_ENDPOINT (see `services.environment`).

Tests add users and mail of their own (unique names), so they share the fakes
without seeing each other's data."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.fake_google import FakeGoogle
from tests.support.fake_graph import FakeGraph


@pytest.fixture(scope="session")
def fake_google() -> Iterator[FakeGoogle]:
    with FakeGoogle() as fake:
        yield fake


@pytest.fixture(scope="session")
def fake_graph() -> Iterator[FakeGraph]:
    # The server runs in this process: its connection checks must trust the fake's
    # CA too, as the workers do through their environment.
    previous = os.environ.get("REQUESTS_CA_BUNDLE")
    with FakeGraph() as fake:
        os.environ["REQUESTS_CA_BUNDLE"] = str(fake.ca_path)
        try:
            yield fake
        finally:
            if previous is None:
                os.environ.pop("REQUESTS_CA_BUNDLE", None)
            else:
                os.environ["REQUESTS_CA_BUNDLE"] = previous
