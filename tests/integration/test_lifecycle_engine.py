"""The life cycle driven in this process, with in-memory fakes of the job queue and
of a provider (the database is the real PostgreSQL): every transition a run, its
mailboxes and its source go through, one job at a time, in the order a test says."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import ClassVar

import pytest
from sqlalchemy import func, select, update

from ingestion_grpc import bootstrap
from ingestion_grpc.archive.blobstore import LocalBlobStore, sha256_hex
from ingestion_grpc.config import Settings
from ingestion_grpc.crypto import CredentialCipher
from ingestion_grpc.db.models import IngestionSource, RunMailbox, SyncSession, User, new_id
from ingestion_grpc.db.session import Database
from ingestion_grpc.domain import lifecycle
from ingestion_grpc.domain.lifecycle import JobQueue, RunKind, SourceStatus
from ingestion_grpc.engine import mailboxes, runs, scheduler
from ingestion_grpc.engine.context import EngineContext
from ingestion_grpc.engine.heartbeat import MailboxHeartbeat
from ingestion_grpc.errors import Conflict, MailboxUnavailable, Unavailable
from ingestion_grpc.providers.base import (
    MAX_CONCURRENT_MAILBOXES_FIELD,
    Batch,
    ConfigField,
    FetchContext,
    FetchedMessage,
    JsonDict,
    Mailbox,
    Provider,
)
from ingestion_grpc.providers.registry import register
from tests.support.fetch_context import LocalLimiter
from tests.support.polling import wait_for


class InMemoryQueue(JobQueue):
    """Keeps the jobs sent; `fail` makes the next sends raise as a Redis outage would."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, RunKind]] = []
        self.mailboxes: list[tuple[str, str]] = []
        self.fail = False

    def enqueue_run(self, source_id: str, kind: RunKind) -> None:
        if self.fail:
            raise Unavailable("The job queue is unavailable; try again shortly.")
        self.runs.append((source_id, kind))

    def enqueue_mailbox(self, run_id: str, mailbox: str) -> None:
        if self.fail:
            raise Unavailable("The job queue is unavailable; try again shortly.")
        self.mailboxes.append((run_id, mailbox))

    def backlog(self) -> int:
        return len(self.runs) + len(self.mailboxes)

    def ping(self) -> None:
        pass


# {box: {mailbox id: [raw messages]}}; a mailbox id starting "x-" cannot be opened.
MAIL: dict[str, dict[str, list[bytes]]] = {}
# {box: called in the provider before each batch but the first}
BEFORE_NEXT_BATCH: dict[str, Callable[[], None]] = {}


class InMemoryTenant(Provider):
    """Serves MAIL[config["box"]], two messages a batch; a batch's cursor is its end."""

    name = "in_memory_tenant"
    fields = (ConfigField("box", str), MAX_CONCURRENT_MAILBOXES_FIELD)
    limits: ClassVar = ()

    def check_connection(self) -> None:
        pass

    def list_mailboxes(self) -> list[Mailbox]:
        return [Mailbox(m, f"{m}@example.com") for m in sorted(MAIL[self.config["box"]])]

    def fetch(
        self, mailbox: Mailbox, cursor: JsonDict | None, context: FetchContext
    ) -> Iterator[Batch]:
        if mailbox.id.startswith("x-"):
            raise MailboxUnavailable("no mail licence")
        messages = MAIL[self.config["box"]][mailbox.id]
        start = int((cursor or {}).get("next", 0))
        for index in range(start, len(messages), 2):
            if index > start and self.config["box"] in BEFORE_NEXT_BATCH:
                BEFORE_NEXT_BATCH[self.config["box"]]()
            part = messages[index : index + 2]
            fetched = [
                FetchedMessage(raw, ("Inbox",), f"{mailbox.id}:{index + i}")
                for i, raw in enumerate(part)
            ]
            yield Batch(fetched, {"next": index + len(part)})


register(InMemoryTenant)


@pytest.fixture
def ctx(settings: Settings, tmp_path: Path) -> Iterator[EngineContext]:
    database = Database(settings.database_url)
    context = EngineContext(
        database=database,
        cipher=CredentialCipher(settings.encryption_key),
        blobs=LocalBlobStore(tmp_path / "blobs"),
        jobs=InMemoryQueue(),
        limits=LocalLimiter(()),
        sync_interval=settings.sync_interval,
        stale_after=settings.stale_run_after,
        provider_environment=bootstrap.provider_environment(settings),
    )
    yield context
    database.dispose()


def queue(ctx: EngineContext) -> InMemoryQueue:
    assert isinstance(ctx.jobs, InMemoryQueue)
    return ctx.jobs


def new_source(ctx: EngineContext, mail: dict[str, list[bytes]], cap: int | None = None) -> str:
    box = new_id()
    MAIL[box] = mail
    config: JsonDict = {"box": box}
    if cap is not None:
        config["maxConcurrentMailboxes"] = cap
    with ctx.database.unit_of_work() as uow:
        owner = uow.session.scalars(select(User.id).limit(1)).one()
        source_id = new_id()
        uow.session.add(
            IngestionSource(
                id=source_id,
                owner_id=owner,
                name="in memory",
                provider=InMemoryTenant.name,
                status=SourceStatus.AUTH_SUCCESS,
                sealed_config=ctx.cipher.seal(config, bound_to=source_id),
            )
        )
        uow.commit()
    return source_id


def claim(ctx: EngineContext, source_id: str, kind: RunKind = RunKind.IMPORT) -> str:
    with ctx.database.unit_of_work() as uow:
        source = uow.session.get(IngestionSource, source_id)
        assert source is not None
        run = lifecycle.claim_run(uow, source, kind, ctx.jobs)
        uow.commit()
    return run.id


def drain(ctx: EngineContext, *, mailbox_limit: int | None = None) -> int:
    """Run the queued jobs in order; how many mailbox jobs ran."""
    jobs, ran = queue(ctx), 0
    while jobs.runs or jobs.mailboxes:
        if jobs.runs:
            source_id, kind = jobs.runs.pop(0)
            runs.start_run(ctx, source_id, kind, final_attempt=True)
            continue
        if mailbox_limit is not None and ran >= mailbox_limit:
            return ran
        run_id, mailbox = jobs.mailboxes.pop(0)
        mailboxes.ingest_mailbox(ctx, run_id, mailbox, final_attempt=True)
        ran += 1
    return ran


def status(ctx: EngineContext, source_id: str) -> str:
    with ctx.database.unit_of_work() as uow:
        source = uow.session.get(IngestionSource, source_id)
        assert source is not None
        return source.status


def run_row(ctx: EngineContext, run_id: str) -> SyncSession:
    with ctx.database.unit_of_work() as uow:
        run = uow.session.get(SyncSession, run_id)
        assert run is not None
        return run


def mailbox_states(ctx: EngineContext, run_id: str) -> dict[str, str]:
    with ctx.database.unit_of_work() as uow:
        rows = uow.session.query(RunMailbox).filter(RunMailbox.run_id == run_id).all()
        return {row.mailbox: row.state for row in rows}


def mail(count: int, tag: str) -> list[bytes]:
    return [b"Subject: %s %d\r\n\r\nbody\r\n" % (tag.encode(), i) for i in range(count)]


def test_an_import_runs_from_claim_to_active(grpc_server: object, ctx: EngineContext) -> None:
    source_id = new_source(ctx, {"a": mail(5, "a"), "b": mail(3, "b"), "x-c": []})
    run_id = claim(ctx, source_id)
    assert status(ctx, source_id) == "importing"
    assert queue(ctx).runs == [(source_id, RunKind.IMPORT)]
    with pytest.raises(Conflict, match="already running"):
        claim(ctx, source_id)
    drain(ctx)
    assert status(ctx, source_id) == "active"
    run = run_row(ctx, run_id)
    assert (run.status, run.messages_archived, run.mailboxes_total) == ("completed", 8, 3)
    assert (run.mailboxes_done, run.mailboxes_skipped) == (2, 1)
    assert mailbox_states(ctx, run_id) == {"a": "done", "b": "done", "x-c": "skipped"}


def test_the_cap_sends_the_next_mailbox_only_when_one_ends(
    grpc_server: object, ctx: EngineContext
) -> None:
    source_id = new_source(ctx, {f"m{i}": mail(2, f"m{i}") for i in range(5)}, cap=2)
    run_id = claim(ctx, source_id)
    runs.start_run(ctx, *queue(ctx).runs.pop(0), final_attempt=True)
    assert [m for _, m in queue(ctx).mailboxes] == ["m0", "m1"]
    drain(ctx, mailbox_limit=1)  # m0 ends: m2 is sent
    assert [m for _, m in queue(ctx).mailboxes] == ["m1", "m2"]
    drain(ctx)
    assert set(mailbox_states(ctx, run_id).values()) == {"done"}
    assert run_row(ctx, run_id).messages_archived == 10


def test_a_job_that_cannot_be_sent_gives_the_claim_back(
    grpc_server: object, ctx: EngineContext
) -> None:
    source_id = new_source(ctx, {"a": mail(1, "a")})
    queue(ctx).fail = True
    with pytest.raises(Unavailable):
        claim(ctx, source_id)
    assert status(ctx, source_id) == "auth_success"
    queue(ctx).fail = False
    claim(ctx, source_id)  # and the caller may try again
    drain(ctx)
    assert status(ctx, source_id) == "active"


def test_pause_hands_the_mailbox_back_and_resume_continues_the_same_run(
    grpc_server: object, ctx: EngineContext
) -> None:
    source_id = new_source(ctx, {"a": mail(6, "a")})
    run_id = claim(ctx, source_id)
    runs.start_run(ctx, *queue(ctx).runs.pop(0), final_attempt=True)
    with ctx.database.unit_of_work() as uow:
        source = uow.session.get(IngestionSource, source_id)
        assert source is not None
        lifecycle.pause(source)
        uow.commit()
    drain(ctx)  # the mailbox job finds its source paused: it hands the mailbox back
    assert status(ctx, source_id) == "paused"
    assert run_row(ctx, run_id).status == "paused"
    assert mailbox_states(ctx, run_id) == {"a": "pending"}
    with ctx.database.unit_of_work() as uow:
        source = uow.session.get(IngestionSource, source_id)
        assert source is not None
        lifecycle.set_status(uow, source, "active", ctx.jobs)
        uow.commit()
    drain(ctx)
    run = run_row(ctx, run_id)
    assert (run.status, run.messages_archived) == ("completed", 6)
    assert status(ctx, source_id) == "active"


def test_a_tenant_with_every_mailbox_skipped_ends_in_error(
    grpc_server: object, ctx: EngineContext
) -> None:
    source_id = new_source(ctx, {"x-a": [], "x-b": []})
    run_id = claim(ctx, source_id)
    drain(ctx)
    assert status(ctx, source_id) == "error"
    assert run_row(ctx, run_id).status == "failed"


def test_a_dead_workers_mailbox_is_sent_again_by_the_watchdog(
    grpc_server: object, ctx: EngineContext
) -> None:
    source_id = new_source(ctx, {"a": mail(4, "a")})
    run_id = claim(ctx, source_id)
    runs.start_run(ctx, *queue(ctx).runs.pop(0), final_attempt=True)
    queue(ctx).mailboxes.clear()  # the job was taken by a worker...
    with ctx.database.unit_of_work() as uow:
        claimed = lifecycle.claim_mailbox(uow, run_id, "a", ctx.stale_after)
        uow.commit()
    assert claimed is not None  # ...that died holding the mailbox
    scheduler.revive_lost_mailboxes(ctx)
    assert queue(ctx).mailboxes == []  # its heartbeat is still fresh
    stale = dataclasses.replace(ctx, stale_after=timedelta(0))
    scheduler.revive_lost_mailboxes(stale)
    assert queue(ctx).mailboxes == [(run_id, "a")]
    drain(ctx)
    assert run_row(ctx, run_id).messages_archived == 4
    assert status(ctx, source_id) == "active"


def test_work_an_emptied_queue_lost_is_sent_again_at_once(
    grpc_server: object, ctx: EngineContext
) -> None:
    """Redis restarted without persistence: its jobs are gone, and nothing says so
    but the queue's own sign. The watchdog sends them again at its next tick, not
    after STALE_RUN_AFTER."""
    jobs = queue(ctx)
    source_id = new_source(ctx, {"a": mail(3, "a")})
    run_id = claim(ctx, source_id)
    # Other tests' sources share the database: only this one's jobs are looked at.
    jobs.runs.clear()  # the run's job, lost with Redis
    scheduler.revive_lost_runs(ctx)
    # Claimed a moment ago: by the clock it may still be queued.
    assert (source_id, RunKind.IMPORT) not in jobs.runs
    scheduler.revive_lost_runs(ctx, queue_emptied=True)
    assert (source_id, RunKind.IMPORT) in jobs.runs
    jobs.runs.clear()
    runs.start_run(ctx, source_id, RunKind.IMPORT, final_attempt=True)
    jobs.mailboxes.clear()  # the mailbox's job, lost with Redis
    scheduler.revive_lost_mailboxes(ctx)
    assert (run_id, "a") not in jobs.mailboxes
    scheduler.revive_lost_mailboxes(ctx, queue_emptied=True)
    assert (run_id, "a") in jobs.mailboxes
    jobs.mailboxes[:] = [(run_id, "a")]  # other tests' leftovers are not this test's
    drain(ctx)
    assert run_row(ctx, run_id).messages_archived == 3
    assert status(ctx, source_id) == "active"


def heartbeat_of(ctx: EngineContext, run_id: str, mailbox: str) -> object:
    with ctx.database.unit_of_work() as uow:
        return uow.session.scalar(
            select(RunMailbox.heartbeat_at).where(
                RunMailbox.run_id == run_id, RunMailbox.mailbox == mailbox
            )
        )


def test_the_heartbeat_beats_while_held_and_goes_quiet_in_a_hung_batch(
    grpc_server: object, ctx: EngineContext, caplog: pytest.LogCaptureFixture
) -> None:
    source_id = new_source(ctx, {"a": mail(2, "a")})
    run_id = claim(ctx, source_id)
    runs.start_run(ctx, *queue(ctx).runs.pop(0), final_attempt=True)
    queue(ctx).mailboxes.clear()  # the job was taken by this "worker"
    with ctx.database.unit_of_work() as uow:
        held = lifecycle.claim_mailbox(uow, run_id, "a", ctx.stale_after)
        uow.commit()
    assert held is not None
    claimed_at = heartbeat_of(ctx, run_id, "a")
    with MailboxHeartbeat(ctx.database, held, timedelta(seconds=1)):
        wait_for(
            lambda: heartbeat_of(ctx, run_id, "a"),
            lambda beat: beat != claimed_at,
            timeout=30,
            what="a heartbeat",
        )
    last_beat = heartbeat_of(ctx, run_id, "a")
    with MailboxHeartbeat(ctx.database, held, timedelta(seconds=1), hung_after=0.0):
        wait_for(lambda: caplog.text, lambda text: "no longer reported alive" in text, timeout=30)
    assert heartbeat_of(ctx, run_id, "a") == last_beat  # quiet: the watchdog may take it
    scheduler.revive_lost_mailboxes(dataclasses.replace(ctx, stale_after=timedelta(0)))
    drain(ctx)
    assert run_row(ctx, run_id).messages_archived == 2


def test_a_job_whose_mailbox_was_taken_over_stores_nothing_more(
    grpc_server: object, ctx: EngineContext, caplog: pytest.LogCaptureFixture
) -> None:
    messages = mail(4, "taken")
    source_id = new_source(ctx, {"a": messages})
    box = next(box for box, served in MAIL.items() if served.get("a") is messages)
    run_id = claim(ctx, source_id)

    def taken_over() -> None:
        # Once the first batch is committed, another worker takes the mailbox,
        # and this job's heartbeat notices before its next batch arrives.
        wait_for(lambda: run_row(ctx, run_id).messages_archived, lambda n: n == 2, timeout=30)
        with ctx.database.unit_of_work() as uow:
            uow.session.execute(
                update(RunMailbox)
                .where(RunMailbox.run_id == run_id)
                .values(lease=new_id(), heartbeat_at=func.now())
            )
            uow.commit()
        wait_for(lambda: caplog.text, lambda text: "lost the lease" in text, timeout=30)
        del BEFORE_NEXT_BATCH[box]

    BEFORE_NEXT_BATCH[box] = taken_over
    runs.start_run(ctx, *queue(ctx).runs.pop(0), final_attempt=True)
    assert queue(ctx).mailboxes.pop(0) == (run_id, "a")
    mailboxes.ingest_mailbox(ctx, run_id, "a", final_attempt=True)
    assert run_row(ctx, run_id).messages_archived == 2
    # Not even the blobs of the second batch were written.
    assert [ctx.blobs.exists(sha256_hex(raw)) for raw in messages] == [True, True, False, False]
    assert mailbox_states(ctx, run_id) == {"a": "running"}  # the other worker's now
    scheduler.revive_lost_mailboxes(dataclasses.replace(ctx, stale_after=timedelta(0)))
    drain(ctx)
    assert run_row(ctx, run_id).messages_archived == 4
    assert status(ctx, source_id) == "active"
