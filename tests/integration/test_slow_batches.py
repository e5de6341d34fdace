"""A batch slower than STALE_RUN_AFTER (3 s in tests) is not a dead worker.

A worker's heartbeat goes on while a batch is being fetched (engine/heartbeat.py):
the watchdog, ticking all along, never hands the mailbox to another worker, and
the import ends with every message downloaded and archived once.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select

from ingestion_grpc.db.models import RunMailbox
from ingestion_grpc.engine.context import EngineContext
from ingestion_grpc.engine.scheduler import tick
from tests.support.conformance import sha
from tests.support.corpora import HAM, mbox_messages
from tests.support.fake_tenant import FakeTenantServer
from tests.support.polling import wait_for
from tests.support.rest import Rest
from tests.support.sources import RUNNING, archived, create_source, latest_run
from tests.support.workers import Worker

# Six messages, two downloads at a time (the provider's slot limit), 2.5 s each:
# one batch of about 7.5 s, well over STALE_RUN_AFTER.
MESSAGES = 6
LATENCY = 2.5


def leases(engine: EngineContext, run_id: str) -> set[str]:
    with engine.database.unit_of_work() as uow:
        return {
            lease
            for lease in uow.session.scalars(
                select(RunMailbox.lease).where(RunMailbox.run_id == run_id)
            )
            if lease is not None
        }


def test_a_batch_slower_than_stale_run_after_keeps_its_mailbox(
    admin: Rest, engine: EngineContext, start_worker: Callable[[], Worker]
) -> None:
    assert engine.stale_after.total_seconds() * 2 < LATENCY * MESSAGES / 2
    start_worker()
    tenant = FakeTenantServer(latency=LATENCY).start()
    try:
        user = tenant.add_user("slow", "slow@tenant.test")
        messages = list(mbox_messages(HAM)[:MESSAGES])
        for index, raw in enumerate(messages):
            user.messages[f"m{index}"] = (raw, ["Inbox"])
        config = {"endpoint": tenant.url, "batchSize": MESSAGES}
        source = create_source(admin, "slow batches", "fake_tenant", config)
        source_id = source["id"]

        # Every lease the mailbox is held under, while the scheduler ticks: a
        # second one would be another worker's claim.
        seen: set[str] = set()

        def observe() -> tuple[str, set[str]]:
            tick(engine)
            runs = admin.get(f"/v1/ingestion-sources/{source_id}/sync-sessions").json()
            if runs["syncSessions"]:
                seen.update(leases(engine, runs["syncSessions"][0]["id"]))
            status = admin.get(f"/v1/ingestion-sources/{source_id}").json()["status"]
            return status, set(seen)

        status, held_under = wait_for(
            observe,
            lambda state: state[0] not in RUNNING or len(state[1]) > 1,
            timeout=90,
            what="the import of one slow batch",
        )
        assert len(held_under) == 1, f"the mailbox was taken over: {len(held_under)} claims"
        assert status == "active"
        assert sorted(tenant.downloads_of("slow")) == [f"m{i}" for i in range(MESSAGES)]
    finally:
        tenant.stop()
    rows = archived(admin, source_id)
    assert sorted(row["sha256"] for row in rows) == sorted(sha(raw) for raw in messages)
    run = latest_run(admin, source_id)
    assert (run["status"], run["messagesFetched"], run["messagesArchived"]) == (
        "completed",
        MESSAGES,
        MESSAGES,
    )
