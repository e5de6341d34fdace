"""The life-cycle rules as plain functions: no database, no queue."""

from __future__ import annotations

from datetime import timedelta

import pytest

from ingestion_grpc.domain.lifecycle import (
    MAX_BACKOFF,
    RunKind,
    RunState,
    SourceStatus,
    client_may_set,
    next_sync_delay,
    run_may_start,
    run_outcome,
    status_after_run,
)
from ingestion_grpc.errors import Conflict, InvalidArgument


@pytest.mark.parametrize("status", ["auth_success", "active", "error", "imported"])
def test_a_run_may_start_from_an_idle_status(status: str) -> None:
    run_may_start(SourceStatus(status))


@pytest.mark.parametrize(
    ("status", "says"),
    [
        ("paused", "paused: resume it"),
        ("importing", "already running"),
        ("syncing", "already running"),
        ("pending_auth", "while the source is pending_auth"),
    ],
)
def test_a_run_may_not_start_from_a_busy_status(status: str, says: str) -> None:
    with pytest.raises(Conflict, match=says):
        run_may_start(SourceStatus(status))


def test_clients_may_only_pause_or_resume() -> None:
    with pytest.raises(InvalidArgument) as caught:
        client_may_set(SourceStatus.ACTIVE, "error")
    assert caught.value.field == "status"
    with pytest.raises(Conflict, match="pause the source instead"):
        client_may_set(SourceStatus.IMPORTING, "active")
    client_may_set(SourceStatus.IMPORTING, "paused")
    client_may_set(SourceStatus.PAUSED, "active")


@pytest.mark.parametrize(
    ("states", "listing_failed", "outcome"),
    [
        ({"done": 3}, False, RunState.COMPLETED),
        ({"done": 2, "skipped": 1}, False, RunState.COMPLETED),
        ({"done": 2, "failed": 1}, False, RunState.FAILED),
        ({"skipped": 2}, False, RunState.FAILED),  # nothing could be read at all
        ({}, False, RunState.COMPLETED),  # a tenant without users
        ({}, True, RunState.FAILED),
    ],
)
def test_how_a_run_comes_out(states: dict[str, int], listing_failed: bool, outcome: str) -> None:
    assert run_outcome(states, listing_failed=listing_failed) == outcome


def test_the_status_after_a_run() -> None:
    importing = SourceStatus.IMPORTING
    done, failed = RunState.COMPLETED, RunState.FAILED
    assert status_after_run(importing, RunKind.IMPORT, done, continuous_sync=True) == "active"
    assert status_after_run(importing, RunKind.IMPORT, done, continuous_sync=False) == "imported"
    assert status_after_run(importing, RunKind.IMPORT, failed, continuous_sync=True) == "error"
    # A pause while the run went on is kept.
    paused = SourceStatus.PAUSED
    assert status_after_run(paused, RunKind.IMPORT, done, continuous_sync=True) == "paused"


def test_failed_runs_back_off_up_to_six_hours() -> None:
    interval = timedelta(minutes=5)
    assert next_sync_delay(interval, 0) == interval
    assert next_sync_delay(interval, 1) == timedelta(minutes=10)
    assert next_sync_delay(interval, 3) == timedelta(minutes=40)
    assert next_sync_delay(interval, 50) == MAX_BACKOFF
