"""Faults during a large import, each on servers this module starts and stops itself.

PostgreSQL, Redis and Dovecot are this module's own (never the machine's), and so
are the gRPC server, Envoy, the scheduler and the workers: every part can be
stopped, killed or restarted. The IMAP traffic goes through a proxy that slows it
down, so that an import of 1,500 real messages lasts long enough for a fault to
hit it, and that can reset every connection.

Each fault test ends the same way: the source `active`, the run completed with
exactly as many messages archived as the source holds, none twice, every archived
file byte for byte the source's, and all of it without help within a minute of
the fault ending.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DataError

from ingestion_grpc.db.session import Database, ping
from ingestion_grpc.errors import DatabaseUnavailable
from tests.support.corpora import HAM, mbox_messages
from tests.support.dovecot import Dovecot
from tests.support.envoy import EnvoyProxy, free_port, start_envoy, wait_healthy
from tests.support.polling import wait_for
from tests.support.rest import Rest
from tests.support.servers import FlakyProxy, Postgres, RedisServer, ServiceProcess
from tests.support.sources import archived, create_source, latest_run, mid_run
from tests.support.workers import Worker

ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "fault-tests-admin-password"
# What "recovering by itself within a minute" allows once the fault has ended.
RECOVERY_SECONDS = 60.0
# The proxy's pace: an import of 1,500 messages (5 MB) takes about 5 s, and its
# first batch of 500 is archived after 2.
IMAP_BYTES_PER_SECOND = 1_000_000
LARGE = 1500
# Long enough that the watchdog's stale-run timeout cannot be what recovers a
# test that sets it (only the SIGKILL test relies on it, with a short one).
NEVER_STALE = "10m"
BLOBS_TMPFS = "160m"
FAST_CLOCK = Path(__file__).parents[1] / "support" / "fast_clock"
_numbers = itertools.count()


@dataclass
class FaultStack:
    workdir: Path
    postgres: Postgres
    redis: RedisServer
    dovecot: Dovecot
    imap: FlakyProxy
    server: ServiceProcess
    envoy: EnvoyProxy
    admin: Rest
    environment: dict[str, str]
    blobs: Path
    processes: list[Worker | ServiceProcess] = field(default_factory=list)

    def start_engine(self, stale_run_after: str = NEVER_STALE, threads: int = 2) -> Worker:
        """A scheduler and one worker, both stopped after the test."""
        self.start_scheduler(stale_run_after)
        return self.start_worker(stale_run_after, threads)

    def start_scheduler(self, stale_run_after: str) -> None:
        """`ingestion-grpc scheduler`, ticking every second."""
        overrides = {**self.environment, "STALE_RUN_AFTER": stale_run_after}
        log_path = self.workdir / f"scheduler-{next(_numbers)}.log"
        self.processes.append(ServiceProcess(["scheduler"], overrides, log_path).start())

    def start_worker(
        self, stale_run_after: str = NEVER_STALE, threads: int = 2, clock_ahead: float = 0
    ) -> Worker:
        """`clock_ahead`: seconds the worker's own clock is fast (tests/support/fast_clock)."""
        overrides = {**self.environment, "STALE_RUN_AFTER": stale_run_after}
        if clock_ahead:
            path = os.pathsep.join(filter(None, [str(FAST_CLOCK), os.environ.get("PYTHONPATH")]))
            overrides |= {"PYTHONPATH": path, "FAST_CLOCK_SECONDS": str(clock_ahead)}
        worker = Worker(overrides, self.workdir / f"worker-{next(_numbers)}.log", threads)
        self.processes.append(worker.start())
        return worker

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log()[-4000:]}" for p in self.processes)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return mounted.returncode == 0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    workdir = tmp_path_factory.mktemp("faults")
    data_dir = workdir / "data"
    blobs = data_dir / "blobs"
    with contextlib.ExitStack() as cleanup:
        blobs_mounted = _mount_tmpfs(blobs, BLOBS_TMPFS)
        if blobs_mounted:
            cleanup.callback(subprocess.run, ["umount", "-l", str(blobs)], check=False)
        postgres = Postgres()
        cleanup.callback(postgres.remove)
        postgres.start()
        redis = RedisServer(workdir / "redis")
        cleanup.callback(redis.stop)
        redis.start()
        dovecot = Dovecot(tls=False)
        cleanup.callback(dovecot.stop)
        dovecot.start()
        imap = FlakyProxy(dovecot.port, IMAP_BYTES_PER_SECOND)
        cleanup.callback(imap.close)
        (workdir / "metrics").mkdir()
        environment = {
            "DATA_DIR": str(data_dir),
            "DATABASE_URL": postgres.url,
            "REDIS_URL": redis.url,
            "QUEUE_NAMESPACE": "faults",
            "JWT_SECRET": secrets.token_urlsafe(32),
            "ENCRYPTION_KEY": secrets.token_hex(32),
            "GRPC_PORT": str(free_port()),
            "METRICS_PORT": "0",
            "PROMETHEUS_MULTIPROC_DIR": str(workdir / "metrics"),
            "SCHEDULER_TICK": "1s",
            "ADMIN_EMAIL": ADMIN_EMAIL,
            "ADMIN_PASSWORD": ADMIN_PASSWORD,
        }
        server = ServiceProcess(["server"], environment, workdir / "server.log")
        cleanup.callback(server.stop)
        server.start()
        envoy = start_envoy(int(environment["GRPC_PORT"]), workdir / "envoy")
        cleanup.callback(envoy.stop)
        wait_healthy(envoy.base_url, timeout=60)
        yield FaultStack(
            workdir, postgres, redis, dovecot, imap, server, envoy,
            Rest(envoy.base_url).login(ADMIN_EMAIL, ADMIN_PASSWORD), environment,
            blobs if blobs_mounted else Path(),
        )  # fmt: skip


@pytest.fixture
def faults(stack: FaultStack) -> Iterator[FaultStack]:
    """The stack, with this test's scheduler and workers stopped after it (and
    their logs in the failure's report)."""
    stack.processes = []
    yield stack
    for process in stack.processes:
        # Nothing of a worker is needed after its test: no need to wait for it.
        process.kill() if isinstance(process, Worker) else process.stop()


@dataclass(frozen=True)
class Mailbox:
    email: str
    source_id: str
    messages: dict[str, bytes]  # sha256 -> raw, as the IMAP server serves it


def large_mailbox(faults: FaultStack, tag: str, count: int = LARGE) -> tuple[str, dict[str, bytes]]:
    """A Dovecot user with `count` real messages in two folders, unique to this test."""
    email = faults.dovecot.new_user(tag)
    messages = [b"X-Fault-Test: %s %d\r\n" % (tag.encode(), i) + raw
                for i, raw in enumerate(mbox_messages(HAM)[:count])]  # fmt: skip
    half = len(messages) // 2
    faults.dovecot.append(email, "INBOX", messages[:half])
    faults.dovecot.append(email, "Archive/2002", messages[half:])
    return email, served(faults.dovecot, email)


def served(dovecot: Dovecot, email: str) -> dict[str, bytes]:
    """{sha256: raw} of everything the IMAP server serves for the user."""
    result: dict[str, bytes] = {}
    with dovecot.client(email) as imap:
        for flags, _delimiter, name in imap.list_folders():
            if b"\\Noselect" in flags:
                continue
            imap.select_folder(name, readonly=True)
            uids = imap.search("ALL")
            for data in (imap.fetch(uids, ["BODY.PEEK[]"]) if uids else {}).values():
                result[hashlib.sha256(data[b"BODY[]"]).hexdigest()] = data[b"BODY[]"]
    return result


def import_through_proxy(faults: FaultStack, email: str) -> str:
    """Create the IMAP source, reached through the flaky proxy; its id."""
    config = faults.dovecot.provider_config(email) | {"port": faults.imap.port}
    return str(create_source(faults.admin, email, "generic_imap", config)["id"])


def assert_imported_exactly(
    faults: FaultStack, source_id: str, messages: dict[str, bytes], timeout: float
) -> None:
    """Within `timeout`: the source active, its run complete, every message once,
    each archived file byte for byte the source's."""
    client = faults.admin
    try:
        source = wait_for(
            lambda: client.get(f"/v1/ingestion-sources/{source_id}").json(),
            lambda s: s.get("status") not in ("importing", "syncing"),
            timeout=timeout,
            what="the import to end",
        )
    except AssertionError as timed_out:
        raise AssertionError(f"{timed_out}\n{faults.logs()}") from None
    assert source["status"] == "active", (source, faults.logs())
    run = latest_run(client, source_id)
    assert run["status"] == "completed", run
    assert run["messagesArchived"] == len(messages), run
    rows = archived(client, source_id)
    assert len(rows) == len(messages)
    assert sorted(r["sha256"] for r in rows) == sorted(messages)
    for sha256 in messages:
        stored = (faults.blobs / sha256[:2] / sha256).read_bytes()
        assert hashlib.sha256(stored).digest() == hashlib.sha256(messages[sha256]).digest()
    leftovers = [p.name for p in faults.blobs.rglob(".*.tmp")]
    assert leftovers == [], "a half-written blob was left behind"


def mid_import(faults: FaultStack, source_id: str, total: int) -> int:
    """Once the import has archived its first batch (and not everything): how many."""
    run = mid_run(faults.admin, source_id, timeout=60)
    assert 0 < run["messagesArchived"] < total, run
    return int(run["messagesArchived"])


# --- the database down: 503 for every method ---------------------------------------

OCTETS = {"Content-Type": "application/octet-stream"}
UNAVAILABLE = {
    "code": 14,
    "message": "The database cannot be reached; try again shortly.",
    "details": [],
}


def test_every_method_answers_503_while_the_database_is_down(faults: FaultStack) -> None:
    client = faults.admin
    email, _ = large_mailbox(faults, "down", count=5)
    faults.start_engine()
    source_id = import_through_proxy(faults, email)
    wait_for(
        lambda: client.get(f"/v1/ingestion-sources/{source_id}").json()["status"],
        lambda status: status == "active",
        timeout=30,
        what="the small import",
    )
    run_id = latest_run(client, source_id)["id"]
    email_id = archived(client, source_id)[0]["id"]
    new_source = {"name": "x", "provider": "generic_imap",
                  "providerConfig": faults.dovecot.provider_config(email)}  # fmt: skip
    calls: list[tuple[str, str, dict[str, object] | None]] = [
        ("POST", "/v1/ingestion-sources", new_source),
        ("GET", "/v1/ingestion-sources", None),
        ("GET", f"/v1/ingestion-sources/{source_id}", None),
        ("PUT", f"/v1/ingestion-sources/{source_id}", {"name": "renamed"}),
        ("DELETE", f"/v1/ingestion-sources/{source_id}", None),
        ("POST", f"/v1/ingestion-sources/{source_id}/import", None),
        ("POST", f"/v1/ingestion-sources/{source_id}/pause", None),
        ("POST", f"/v1/ingestion-sources/{source_id}/sync", None),
        ("GET", f"/v1/ingestion-sources/{source_id}/sync-sessions", None),
        ("GET", f"/v1/ingestion-sources/{source_id}/sync-sessions/{run_id}/mailboxes", None),
        ("GET", f"/v1/ingestion-sources/{source_id}/archived-emails", None),
        ("GET", f"/v1/archived-emails/{email_id}", None),
        ("GET", f"/v1/archived-emails/{email_id}/raw", None),
        ("GET", "/v1/settings/system", None),
        ("PUT", "/v1/settings/system", {"enableDeletion": True}),
        ("GET", "/v1/api-keys", None),
        ("POST", "/v1/api-keys", {"name": "k", "expiresInDays": 1}),
        ("POST", "/v1/auth/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}),
    ]
    faults.postgres.stop()
    try:
        answers = {
            f"{method} {path}": (response.status_code, response.json())
            for method, path, body in calls
            for response in [client.request(method, path, json=body)]
        }
        upload = client.post("/v1/upload", data=b"From x\n", headers=OCTETS)
        answers["POST /v1/upload"] = (upload.status_code, upload.json())
    finally:
        faults.postgres.start()
    assert answers == {call: (503, UNAVAILABLE) for call in answers}
    # Back at once: the next request gets a new connection.
    wait_for(
        lambda: client.get(f"/v1/ingestion-sources/{source_id}").status_code,
        lambda status: status == 200,
        timeout=RECOVERY_SECONDS,
        what="the API to answer again",
    )
    assert client.get(f"/v1/ingestion-sources/{source_id}").json()["name"] == email


# --- PostgreSQL restarted mid-transaction -------------------------------------------


def test_postgres_restart_mid_import_hands_the_mailbox_back_at_once(faults: FaultStack) -> None:
    email, messages = large_mailbox(faults, "pg")
    faults.start_engine(stale_run_after=NEVER_STALE)
    source_id = import_through_proxy(faults, email)
    mid_import(faults, source_id, len(messages))
    # Down for a few seconds: the worker's open transaction is cut, and its
    # first tries to hand the mailbox back fail too.
    faults.postgres.stop("fast")
    time.sleep(3)
    faults.postgres.start()
    # STALE_RUN_AFTER is 10 minutes: only the worker itself can have handed it back.
    assert_imported_exactly(faults, source_id, messages, RECOVERY_SECONDS)


# --- Redis restarted, its data lost -------------------------------------------------


def test_redis_restart_mid_import_loses_no_work(faults: FaultStack) -> None:
    email, messages = large_mailbox(faults, "redis")
    queued_email, queued_messages = large_mailbox(faults, "redis-queued", count=50)
    # One thread (and a prefetch of one): while the import runs, the next job
    # can only wait in Redis.
    faults.start_engine(stale_run_after=NEVER_STALE, threads=1)
    source_id = import_through_proxy(faults, email)
    mid_import(faults, source_id, len(messages))
    queued_id = import_through_proxy(faults, queued_email)
    faults.redis.kill()
    time.sleep(1)
    faults.redis.start()  # empty: the queued import's job is gone
    assert_imported_exactly(faults, source_id, messages, RECOVERY_SECONDS)
    # Not after STALE_RUN_AFTER (10 minutes): the scheduler saw that Redis lost
    # everything and sent the claimed run again.
    assert_imported_exactly(faults, queued_id, queued_messages, RECOVERY_SECONDS)
    # The server's own connection to Redis recovered too: a sync is sent and runs.
    assert faults.admin.post(f"/v1/ingestion-sources/{source_id}/sync").status_code == 202
    synced = wait_for(
        lambda: latest_run(faults.admin, source_id),
        lambda run: run["kind"] == "sync" and run["status"] != "running",
        timeout=RECOVERY_SECONDS,
        what="the sync after the restart",
    )
    assert (synced["status"], synced["messagesArchived"]) == ("completed", 0)


# --- the IMAP server dropping every connection ---------------------------------------


def test_imap_server_dropping_every_connection_mid_import(faults: FaultStack) -> None:
    email, messages = large_mailbox(faults, "imap")
    faults.start_engine()
    source_id = import_through_proxy(faults, email)
    mid_import(faults, source_id, len(messages))
    faults.imap.drop()
    try:
        # Every reconnection is reset too, until the provider's own retries are
        # used up and the engine's begin.
        wait_for(lambda: faults.imap.resets, lambda resets: resets >= 3, timeout=30,
                 what="the worker to reconnect into the outage")  # fmt: skip
        time.sleep(3)
    finally:
        faults.imap.restore()
    assert_imported_exactly(faults, source_id, messages, RECOVERY_SECONDS)


# --- a worker SIGKILLed ----------------------------------------------------------------


def test_worker_sigkilled_mid_import(faults: FaultStack) -> None:
    email, messages = large_mailbox(faults, "sigkill")
    faults.start_scheduler(stale_run_after="5s")
    # For a worker that died, going quiet is the only sign: the watchdog takes its
    # mailbox over once STALE_RUN_AFTER has passed, by the database's clock. This
    # worker's clock is ten minutes fast: heartbeats by its own clock would look
    # fresh for ten minutes.
    doomed = faults.start_worker(stale_run_after="5s", clock_ahead=600)
    source_id = import_through_proxy(faults, email)
    mid_import(faults, source_id, len(messages))
    doomed.kill()
    faults.start_worker(stale_run_after="5s")
    assert_imported_exactly(faults, source_id, messages, RECOVERY_SECONDS)


# --- the archive's disk full -----------------------------------------------------------


def _fill(directory: Path) -> Path:
    """Write a file into `directory` until its file system has no space left."""
    ballast = directory / "ballast"
    chunk = b"\0" * (1 << 20)
    with contextlib.suppress(OSError), ballast.open("wb") as out:
        while True:
            out.write(chunk)
            out.flush()
    return ballast


def test_archive_disk_full_mid_import_waits_then_completes(faults: FaultStack) -> None:
    if faults.blobs == Path():
        pytest.skip("no tmpfs could be mounted for the archive (mount needs root)")
    email, messages = large_mailbox(faults, "disk")
    faults.start_engine()
    source_id = import_through_proxy(faults, email)
    mid_import(faults, source_id, len(messages))
    ballast = _fill(faults.blobs)
    try:
        run_id = latest_run(faults.admin, source_id)["id"]
        mailboxes = f"/v1/ingestion-sources/{source_id}/sync-sessions/{run_id}/mailboxes"
        waiting = wait_for(
            lambda: faults.admin.get(mailboxes).json()["mailboxes"][0],
            lambda mailbox: mailbox["errorMessage"] != "",
            timeout=30,
            what="the mailbox to say why it waits",
        )
        # Pending until its next try (or running it, which shows the last error).
        assert waiting["state"] in ("pending", "running")
        assert waiting["errorMessage"] == "the archive's storage is full; will retry"
        source = faults.admin.get(f"/v1/ingestion-sources/{source_id}").json()
        assert source["status"] == "importing"
    finally:
        ballast.unlink()
    assert_imported_exactly(faults, source_id, messages, RECOVERY_SECONDS)


def test_only_an_unreachable_database_is_unavailable(faults: FaultStack) -> None:
    """A refused connection is DatabaseUnavailable (503); an error of the statement
    itself stays what it is (a 500 that is logged, not a retry)."""
    nowhere = Database(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    with pytest.raises(DatabaseUnavailable):
        ping(nowhere.engine)
    nowhere.dispose()
    database = Database(faults.postgres.url)
    with pytest.raises(DataError), database.engine.connect() as connection:
        connection.execute(text("SELECT 1 / 0"))
    database.dispose()
