"""Fixtures of the file-import tests: the roots a provider may read, passed to it
explicitly as a ProviderEnvironment (never through environment variables)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingestion_grpc.providers.base import ProviderEnvironment
from tests.support.corpora import CORPORA


@pytest.fixture
def env(tmp_path: Path) -> ProviderEnvironment:
    """Roots of this test's own: an import root (created, empty) and an upload root."""
    roots = ProviderEnvironment(import_root=tmp_path / "imports", upload_root=tmp_path / "uploads")
    roots.import_root.mkdir()
    return roots


@pytest.fixture
def import_root(env: ProviderEnvironment) -> Path:
    return env.import_root


@pytest.fixture
def corpora() -> ProviderEnvironment:
    """The shared corpora as the import root (read only)."""
    assert CORPORA.is_dir(), f"the test corpora are missing: expected them in {CORPORA}"
    return ProviderEnvironment(import_root=CORPORA, upload_root=CORPORA / "no-uploads")
