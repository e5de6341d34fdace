"""Providers whose mail reading is not built yet fail their runs at once, clearly."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.integration.test_sources_rest import create
from tests.support.polling import wait_for
from tests.support.rest import Rest
from tests.support.workers import Worker


@pytest.mark.parametrize(
    ("provider", "name"),
    [("google_workspace", "Google Workspace"), ("microsoft_365", "Microsoft 365")],
)
def test_run_of_a_config_only_provider_ends_in_error(
    make_client: Callable[[str], Rest],
    start_worker: Callable[[], Worker],
    provider: str,
    name: str,
) -> None:
    user = make_client("user")
    start_worker()
    source = create(user, provider=provider)
    done = wait_for(
        lambda: user.get(f"/v1/ingestion-sources/{source['id']}").json(),
        lambda s: s["status"] not in ("importing", "syncing"),
        timeout=60,
        what="the run to end",
    )
    assert done["status"] == "error"
    assert (
        f"importing from {name} is not available in this version yet"
        in (done["lastSyncStatusMessage"])
    )
    run = user.get(f"/v1/ingestion-sources/{source['id']}/sync-sessions").json()
    assert run["syncSessions"][0]["status"] == "failed"
