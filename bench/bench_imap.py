"""IMAP import benchmark: one mailbox through the real stack, then the same mailbox
with mbsync for comparison.

What runs (all on this machine):

- a real Dovecot (tests/support/dovecot.py) whose one user's INBOX holds N messages:
  the SpamAssassin ham corpus repeated, each copy made unique by a header;
- a PostgreSQL database and a Redis namespace of this run's own (dropped / cleaned
  at the end), the gRPC server in this process, Envoy in front of it;
- ONE Dramatiq worker subprocess, `--processes 1 --threads 1`: a single IMAP
  connection per mailbox, like mbsync.

Timed: `POST /v1/ingestion-sources` (generic_imap) until `GET` says the source is
`active`. The sync-session counters must say exactly N archived, or the run fails.
Then `mbsync -a` mirrors the same INBOX into a Maildir (default settings, so it
fsyncs every message as we do) and the two rates are compared.

`--archive s3` imports into the S3 blob store instead (ARCHIVE_URL on a new bucket
of a local moto_server, tests/support/s3.py), `--archive both` does each round
with both stores and prints their figures side by side. moto is a Python server
on the same two cores: its figures are our S3 client against moto here, not what
AWS or MinIO would sustain.

    .venv/bin/python bench/bench_imap.py                       # N = 10,000
    .venv/bin/python bench/bench_imap.py --messages 2000
    .venv/bin/python bench/bench_imap.py --compare-rss         # peak RSS at 2,000 and 20,000
    .venv/bin/python bench/bench_imap.py --phases              # + where the time goes
    .venv/bin/python bench/bench_imap.py --py-spy prof.svg     # + profile the worker
    .venv/bin/python bench/bench_imap.py --archive both        # local and S3 stores

`make bench-imap N=2000 ARGS=--phases` does the same. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `tests.support`

import psycopg
import redis
import requests

from ingestion_grpc import bootstrap
from ingestion_grpc.archive.blobstore import LocalBlobStore
from ingestion_grpc.archive.catalog import record_batch
from ingestion_grpc.archive.metadata import parse_metadata
from ingestion_grpc.config import Settings
from ingestion_grpc.db.session import Database
from ingestion_grpc.providers.base import Mailbox
from ingestion_grpc.providers.imap import GenericImap
from ingestion_grpc.server import RunningServer, start_server
from tests.support import workers
from tests.support.corpora import HAM, mbox_messages
from tests.support.dovecot import Dovecot
from tests.support.envoy import EnvoyProxy, start_envoy
from tests.support.fetch_context import NO_CONTEXT, NO_ENVIRONMENT
from tests.support.s3 import S3Server, s3_server

POSTGRES_ADMIN_URL = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_EMAIL = "bench-admin@example.com"
RUNNING = ("importing", "syncing")
POLL_SECONDS = 0.05
WORKER_READY = "Worker process is ready for action."
MB = 1_000_000
MIB = 1024 * 1024


class BenchFailed(Exception):
    """The benchmark could not produce a trustworthy figure."""


# -- the mailbox ----------------------------------------------------------------------


def bench_messages(count: int, tag: str) -> Iterator[bytes]:
    """`count` distinct messages: the ham corpus repeated, each copy with a header in
    front (as tests.support.corpora.numbered), tagged so that two mailboxes of one run
    never share bytes (the blob store would skip the second copy's writes)."""
    corpus = mbox_messages(HAM)
    for index in range(count):
        copy, position = divmod(index, len(corpus))
        yield b"X-Bench-Copy: %s-%d\r\n" % (tag.encode(), copy) + corpus[position]


def seed_mailbox(dovecot: Dovecot, count: int) -> str:
    """A new Dovecot user whose INBOX holds `count` messages; returns its address."""
    # Letters and digits only: the password also goes into mbsync's config file.
    email = dovecot.new_user("bench", password=secrets.token_hex(12))
    started = time.monotonic()
    dovecot.append(email, "INBOX", bench_messages(count, email.split("@")[0]))
    held = dovecot.status(email, "INBOX")["messages"]
    if held != count:
        raise BenchFailed(f"Dovecot holds {held} messages in INBOX, expected {count}")
    print(f"  seeded {count:,} messages in {time.monotonic() - started:.1f} s ({email})")
    return email


# -- the stack --------------------------------------------------------------------------


@dataclass
class Stack:
    """Database, Redis namespace, gRPC server and Envoy of one benchmark run."""

    workdir: Path
    environment: dict[str, str] = field(default_factory=dict)
    database_url: str = ""
    server: RunningServer | None = None
    envoy: EnvoyProxy | None = None
    http: requests.Session = field(default_factory=requests.Session)

    @property
    def base_url(self) -> str:
        assert self.envoy is not None
        return self.envoy.base_url


@contextlib.contextmanager
def running_stack(workdir: Path, environment: Mapping[str, str] | None = None) -> Iterator[Stack]:
    """The stack; `environment` adds to (or overrides) the server's and workers' variables."""
    stack = Stack(workdir)
    suffix = uuid.uuid4().hex[:12]
    database = f"ingestion_bench_{suffix}"
    namespace = f"ingestion-bench-{suffix}"
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    stack.database_url = f"{base}/{database}"
    admin_password = secrets.token_urlsafe(16)
    stack.environment = {
        "DATA_DIR": str(workdir / "data"),
        "DATABASE_URL": stack.database_url,
        "REDIS_URL": REDIS_URL,
        "QUEUE_NAMESPACE": namespace,
        "JWT_SECRET": secrets.token_urlsafe(32),
        "ENCRYPTION_KEY": secrets.token_hex(32),
        "GRPC_PORT": "0",
        "STALE_RUN_AFTER": "2m",
        "ADMIN_EMAIL": ADMIN_EMAIL,
        "ADMIN_PASSWORD": admin_password,
        **(environment or {}),
    }
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    try:
        settings = Settings.from_env(stack.environment)
        stack.server = start_server(settings, port=0, jobs=bootstrap.job_queue(settings))
        stack.envoy = start_envoy(stack.server.port, workdir / "envoy")
        stack.envoy.wait_healthy()
        stack.http.trust_env = False  # straight to Envoy, whatever http_proxy says
        login = stack.http.post(
            f"{stack.base_url}/v1/auth/login",
            json={"email": ADMIN_EMAIL, "password": admin_password},
            timeout=30,
        )
        if login.status_code != 200:
            raise BenchFailed(f"login failed: {login.status_code} {login.text}")
        stack.http.headers["Authorization"] = f"Bearer {login.json()['accessToken']}"
        yield stack
    finally:
        if stack.envoy is not None:
            stack.envoy.stop()
        if stack.server is not None:
            stack.server.stop(grace=1)
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"{namespace}:*"):
            client.delete(key)
        client.close()


# -- the worker and its memory ------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(child) for child in handle.read().split()]
    return found


def _status_kib(pid: int, field_name: str) -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM); 0 once the process is gone."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


class Worker(workers.Worker):
    """The tests' worker process with `--processes 1 --threads 1` (or `threads`), ready
    before the clock starts, and its memory watched.

    Dramatiq's CLI process forks the worker process that runs the actors; that child's
    memory is what we report (the parent only supervises and relays logs)."""

    def __init__(self, environment: dict[str, str], log_path: Path, threads: int = 1) -> None:
        super().__init__(environment, log_path, threads=threads)
        self.peak_sampled_kib = 0
        self._sampling = threading.Event()
        self._sampler: threading.Thread | None = None

    def start(self, timeout: float = 60.0) -> Worker:
        super().start()
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while WORKER_READY not in self.log() or not self.children():
            if self.process.poll() is not None:
                raise BenchFailed(f"the worker exited at start:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise BenchFailed(f"the worker was not ready in {timeout:g} s:\n{self.log()}")
            time.sleep(0.1)
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def children(self) -> list[int]:
        return _children(self.pid)

    def peak_rss_kib(self) -> tuple[int, int]:
        """(the worker children's VmHWM summed, the CLI parent's VmHWM)."""
        return sum(_status_kib(c, "VmHWM") for c in self.children()), _status_kib(self.pid, "VmHWM")

    def _sample(self) -> None:
        # A cross-check of VmHWM, and a figure even if a child is replaced.
        while not self._sampling.wait(0.25):
            rss = sum(_status_kib(c, "VmRSS") for c in self.children())
            self.peak_sampled_kib = max(self.peak_sampled_kib, rss)

    def stop(self) -> None:
        self._sampling.set()
        if self._sampler is not None:
            self._sampler.join()
        super().stop()


class PySpy:
    """`py-spy record` on the worker child, stopped (and written) with SIGINT.

    Samples every thread, idle ones included, with its id as the root frame: look at
    the thread whose stacks pass through `engine.mailboxes._ingest`."""

    def __init__(self, output: Path, pid: int) -> None:
        binary = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        if binary is None:
            raise BenchFailed("--py-spy needs py-spy (.venv/bin/pip install py-spy)")
        fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(output.suffix, "raw")
        self.process = subprocess.Popen(
            [
                *(binary, "record", "--pid", str(pid), "--rate", "100", "--format", fmt),
                # --idle: waits (fsyncs in the pool, PostgreSQL, the IMAP socket) count
                # too, so the thread running the mailbox shows where its wall time goes.
                *("--idle", "--threads", "--output", str(output), "--nonblocking"),
            ],
            stdin=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # attached before the import starts

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- our import ---------------------------------------------------------------------------


@dataclass
class ImportResult:
    messages: int
    size_bytes: int
    seconds: float
    worker_peak_kib: int
    worker_sampled_kib: int
    parent_peak_kib: int
    source_id: str

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def run_import(
    stack: Stack,
    dovecot: Dovecot,
    email: str,
    expected: int,
    *,
    secure: bool,
    profile: Path | None,
    s3: S3Server | None = None,
) -> ImportResult:
    """Import the mailbox through the stack until the source is `active`.

    The worker gets a DATA_DIR of its own (and with `s3`, a new bucket as its
    ARCHIVE_URL): every import starts from an empty blob store (no directories
    made by an earlier round), as a first import does."""
    name = email.split("@")[0] + ("-s3" if s3 else "")
    environment = {**stack.environment, "DATA_DIR": str(stack.workdir / f"data-{name}")}
    if s3 is not None:
        environment.update(s3.new_archive().environment)
    return timed_import(
        stack,
        Worker(environment, stack.workdir / f"worker-{name}.log"),
        {
            "name": email,
            "provider": "generic_imap",
            "providerConfig": dovecot.provider_config(
                email, secure=secure, allow_insecure_cert=secure
            ),
        },
        expected,
        settled="active",
        timeout=max(600.0, expected / 10),
        profile=profile,
    )


def timed_import(
    stack: Stack,
    worker: Worker | Sequence[Worker],
    source: dict[str, Any],
    expected: int,
    *,
    settled: str,
    timeout: float,
    profile: Path | None = None,
) -> ImportResult:
    """Start `worker` (or each of several), create `source` over REST and time it until
    its import is over; then stop the workers. Fails unless the source ends `settled`
    with one completed import that fetched and archived exactly `expected` messages,
    all in the catalog. With several workers, the peak RSS figures are the highest of
    any one worker process."""
    group = [worker] if isinstance(worker, Worker) else list(worker)
    spy: PySpy | None = None
    try:
        for one in group:
            one.start()
        if profile is not None:
            spy = PySpy(profile, group[0].children()[0])
        os.sync()  # nothing left to write back from preparing the input while we are timed
        started = time.monotonic()
        created = stack.http.post(f"{stack.base_url}/v1/ingestion-sources", json=source, timeout=60)
        if created.status_code != 201:
            raise BenchFailed(f"creating the source failed: {created.status_code} {created.text}")
        source_id = created.json()["id"]
        ended = _wait_settled(stack, source_id, timeout=timeout, workers=group)
        seconds = time.monotonic() - started
        peaks = [one.peak_rss_kib() for one in group]
    finally:
        if spy is not None:
            spy.stop()
        for one in group:
            one.stop()
    if ended["status"] != settled:
        raise BenchFailed(
            f"the import ended with status {ended['status']!r}: "
            f"{ended.get('lastSyncStatusMessage')}\n{group[0].log()[-3000:]}"
        )
    sessions = stack.http.get(
        f"{stack.base_url}/v1/ingestion-sources/{source_id}/sync-sessions", timeout=30
    ).json()["syncSessions"]
    run = sessions[0]
    counters = (run["kind"], run["status"], run["messagesArchived"], run["messagesFetched"])
    if len(sessions) != 1 or counters != ("import", "completed", expected, expected):
        raise BenchFailed(
            f"expected one completed import that archived exactly {expected:,} messages; "
            f"the sync sessions say: {sessions}"
        )
    return ImportResult(
        messages=run["messagesArchived"],
        size_bytes=_archived_bytes(stack, source_id, expected),
        seconds=seconds,
        worker_peak_kib=max(child for child, _ in peaks),
        worker_sampled_kib=max(one.peak_sampled_kib for one in group),
        parent_peak_kib=max(parent for _, parent in peaks),
        source_id=source_id,
    )


def _wait_settled(
    stack: Stack, source_id: str, *, timeout: float, workers: Sequence[Worker]
) -> Any:
    deadline = time.monotonic() + timeout
    url = f"{stack.base_url}/v1/ingestion-sources/{source_id}"
    while True:
        source = stack.http.get(url, timeout=30).json()
        if source["status"] not in RUNNING:
            return source
        for worker in workers:
            if worker.process is not None and worker.process.poll() is not None:
                raise BenchFailed(f"a worker died during the import:\n{worker.log()[-3000:]}")
        if time.monotonic() > deadline:
            raise BenchFailed(f"the import did not finish in {timeout:g} s: {source}")
        time.sleep(POLL_SECONDS)


def _archived_bytes(stack: Stack, source_id: str, expected: int) -> int:
    """The archived messages' total size, as the server served them (BODY[])."""
    with psycopg.connect(stack.database_url) as db:
        row = db.execute(
            "SELECT count(*), coalesce(sum(size_bytes), 0) FROM archived_emails "
            "WHERE source_id = %s",
            (source_id,),
        ).fetchone()
    assert row is not None
    if row[0] != expected:
        raise BenchFailed(f"archived_emails holds {row[0]:,} rows, expected {expected:,}")
    return int(row[1])


# -- mbsync -------------------------------------------------------------------------------


@dataclass
class MirrorResult:
    messages: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def run_mbsync(
    dovecot: Dovecot, email: str, expected: int, workdir: Path, *, secure: bool
) -> MirrorResult:
    """Mirror the INBOX with `mbsync -a` into a new Maildir; count what it wrote."""
    binary = shutil.which("mbsync")
    if binary is None:
        raise BenchFailed("mbsync is not installed (apt-get install isync), or pass --no-mbsync")
    home = workdir / f"mbsync-{email.split('@')[0]}"
    maildir = home / "Maildir"
    maildir.mkdir(parents=True)
    host = dovecot.host
    if secure:
        # mbsync verifies the certificate and its name: trust the test certificate,
        # which names `localhost` (mbsync does not match an IP address against it).
        host = "localhost"
        tls = f"SSLType IMAPS\nCertificateFile {dovecot.cert_path}\n"
        port = dovecot.tls_port
    else:
        tls = "SSLType None\n"
        port = dovecot.port
    conf = home / "mbsyncrc"
    conf.write_text(
        f"""\
IMAPAccount bench
Host {host}
Port {port}
User {email}
Pass {dovecot.password(email)}
{tls}
IMAPStore bench-far
Account bench

MaildirStore bench-near
Path {maildir}/
Inbox {maildir}/INBOX

Channel bench
Far :bench-far:
Near :bench-near:
Patterns INBOX
Create Near
Sync Pull
SyncState *
"""
    )
    conf.chmod(0o600)
    os.sync()
    started = time.monotonic()
    done = subprocess.run(
        [binary, "-c", str(conf), "-a"],
        capture_output=True,
        env={**os.environ, "HOME": str(home)},
        check=False,
        timeout=1800,
    )
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise BenchFailed(
            f"mbsync failed ({done.returncode}): {done.stderr.decode(errors='replace')[-2000:]}"
        )
    inbox = maildir / "INBOX"
    written = sum(len(os.listdir(inbox / sub)) for sub in ("cur", "new"))
    if written != expected:
        raise BenchFailed(f"mbsync wrote {written:,} messages, expected {expected:,}")
    return MirrorResult(written, seconds)


# -- where the time goes --------------------------------------------------------------------


@dataclass
class Phases:
    """Seconds per step of the engine's per-batch loop, replayed in this process."""

    batches: int = 0
    messages: int = 0
    imap_fetch: float = 0.0
    blobs: float = 0.0
    metadata_parse: float = 0.0
    database: float = 0.0
    total: float = 0.0


def measure_phases(
    stack: Stack, dovecot: Dovecot, email: str, source_id: str, *, secure: bool
) -> Phases:
    """The loop of engine.mailboxes._ingest, one step at a time, with a clock on each:
    the provider's fetch (IMAP, TLS, imapclient parsing), the blob store's put_many
    (SHA-256, writes, fsyncs, renames, directory fsyncs) into a fresh store on the
    same disk, and archive.catalog.record_batch in its own transaction (metadata
    parsing, timed apart, plus the INSERT and COMMIT). Not replayed: the lease check,
    cursor upsert and counter update (three one-row statements per batch of 500)."""
    config = dovecot.provider_config(email, secure=secure, allow_insecure_cert=secure)
    provider = GenericImap(GenericImap.validate_config(config), NO_ENVIRONMENT)
    blobs = LocalBlobStore(stack.workdir / f"phase-blobs-{email.split('@')[0]}")
    database = Database(stack.database_url)
    phases = Phases()
    clock = time.perf_counter
    os.sync()
    started = clock()
    batches = provider.fetch(Mailbox(email, email), None, NO_CONTEXT)
    try:
        while True:
            mark = clock()
            batch = next(batches, None)
            phases.imap_fetch += clock() - mark
            if batch is None:
                break
            phases.batches += 1
            phases.messages += len(batch.messages)
            mark = clock()
            digests = blobs.put_many([m.raw for m in batch.messages])
            phases.blobs += clock() - mark
            mark = clock()
            for message in batch.messages:
                parse_metadata(message.raw)
            phases.metadata_parse += clock() - mark
            mark = clock()
            with database.unit_of_work() as uow:
                record_batch(uow, source_id, "bench-phases", batch.messages, digests)
                uow.commit()
            phases.database += clock() - mark
    finally:
        batches.close()  # type: ignore[attr-defined]
        database.dispose()
    # record_batch parses every message again: count parsing once, under parsing,
    # and leave the extra pass made here to time it out of the total.
    phases.database -= phases.metadata_parse
    phases.total = clock() - started - phases.metadata_parse
    return phases


# -- reporting ------------------------------------------------------------------------------


def print_import(result: ImportResult, archive: str = "local") -> None:
    mb = result.size_bytes / MB
    label = "ours:" if archive == "local" else f"ours, {archive} archive:"
    print(
        f"  {label:<7} {result.messages:,} messages, {mb:.1f} MB in {result.seconds:.1f} s: "
        f"{result.rate:,.0f} messages/s, {mb / result.seconds:.2f} MB/s"
    )
    print(
        f"          worker process peak RSS {result.worker_peak_kib / 1024:.1f} MiB (VmHWM; "
        f"sampled max {result.worker_sampled_kib / 1024:.1f} MiB); dramatiq CLI parent "
        f"{result.parent_peak_kib / 1024:.1f} MiB"
    )


def print_moto_share(cpu_seconds: float, seconds: float) -> None:
    print(
        f"          moto_server (the S3 endpoint) used {cpu_seconds:.1f} CPU-s of the "
        f"{seconds:.1f} s ({100 * cpu_seconds / seconds:.0f} % of one core)"
    )


def print_file_creation(folder: Path, files: int = 200) -> None:
    """How long creating an empty file takes in the workdir right now.

    Both sides create a file per message, and on this machine's ext4 (no journal)
    that costs from ~15 µs to 0.7 ms depending on where and when (see
    docs/benchmarks.md), so a round's figures are read with this one. The files
    stay until the end, like the rounds' own.
    """
    folder.mkdir()
    times = []
    for number in range(files):
        started = time.perf_counter()
        os.close(os.open(folder / str(number), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        times.append(time.perf_counter() - started)
    print(f"  file system: creating a file takes {statistics.median(times) * 1e6:,.0f} µs here now")


def print_mirror(result: MirrorResult, ours: ImportResult) -> None:
    print(
        f"  mbsync: {result.messages:,} messages in {result.seconds:.1f} s: "
        f"{result.rate:,.0f} messages/s, {ours.size_bytes / MB / result.seconds:.2f} MB/s"
    )
    print(f"  ours / mbsync: {ours.rate / result.rate:.2f}x")


def print_phases(phases: Phases) -> None:
    print(
        f"  phases (engine loop replayed in-process, {phases.messages:,} messages in "
        f"{phases.batches} batches, {phases.total:.1f} s):"
    )
    for label, seconds in (
        ("IMAP fetch (provider.fetch)", phases.imap_fetch),
        ("blob store put_many", phases.blobs),
        ("metadata parsing", phases.metadata_parse),
        ("PostgreSQL insert + commit", phases.database),
    ):
        share = 100 * seconds / phases.total if phases.total else 0.0
        print(f"    {label:<30} {seconds:7.2f} s  {share:5.1f} %")


def print_medians(
    rounds: list[tuple[ImportResult, MirrorResult | None]], archive: str = "local"
) -> None:
    ours = [result for result, _ in rounds]
    mbsync = [mirror for _, mirror in rounds if mirror is not None]
    seconds = statistics.median(r.seconds for r in ours)
    label = "ours" if archive == "local" else f"ours ({archive} archive)"
    print(
        f"  median of {len(rounds)} rounds: {label} {seconds:.1f} s, "
        f"{statistics.median(r.rate for r in ours):,.0f} messages/s, "
        f"{statistics.median(r.size_bytes / MB / r.seconds for r in ours):.2f} MB/s, "
        f"peak RSS {statistics.median(r.worker_peak_kib for r in ours) / 1024:.1f} MiB"
    )
    if mbsync:
        ratios = [r.rate / m.rate for r, m in rounds if m is not None]
        print(
            f"                    mbsync {statistics.median(m.seconds for m in mbsync):.1f} s, "
            f"{statistics.median(m.rate for m in mbsync):,.0f} messages/s; ours / mbsync "
            f"{statistics.median(ratios):.2f}x (range {min(ratios):.2f} to {max(ratios):.2f})"
        )


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-n", "--messages", type=int, default=10_000, help="messages in the mailbox (10000)"
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="IMAP without TLS for both importers (default: implicit TLS, port 993-style)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds per size, each on a new mailbox (1)"
    )
    parser.add_argument("--no-mbsync", action="store_true", help="skip the mbsync comparison")
    parser.add_argument(
        "--archive",
        choices=("local", "s3", "both"),
        default="local",
        help="the blob store imports write to: local files (default), S3 (a local "
        "moto_server), or both, side by side in every round",
    )
    parser.add_argument(
        "--compare-rss",
        nargs="?",
        const="2000,20000",
        metavar="SIZES",
        help="import mailboxes of these sizes (default 2000,20000), each with a fresh "
        "worker, and compare the worker's peak RSS; skips mbsync",
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="then replay the engine's per-batch loop in-process and time each step",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="FILE",
        help="profile the worker during the import (.svg flamegraph, .json speedscope, "
        "else raw collapsed stacks); needs py-spy in the venv",
    )
    parser.add_argument(
        "--workdir", type=Path, help="where data, logs and the Maildir go (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the workdir (logs) at the end")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.repeat < 1:
        parser.error("--messages and --repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    secure = not args.plain
    sizes = [int(s) for s in args.compare_rss.split(",")] if args.compare_rss else [args.messages]
    archives = ["local", "s3"] if args.archive == "both" else [args.archive]
    # SIGTERM (make interrupted, CI timeout) cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="bench-imap-", dir=args.workdir))
    workdir.chmod(0o755)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"IMAP import benchmark: {', '.join(f'{n:,}' for n in sizes)} messages, "
        f"{'implicit TLS' if secure else 'plain IMAP'}, {os.cpu_count()} CPUs, "
        f"load average {load} (other work on the machine skews every figure)"
    )
    print(f"  workdir {workdir}")
    try:
        with contextlib.ExitStack() as cleanup:
            dovecot = cleanup.enter_context(Dovecot(tls=secure))
            stack = cleanup.enter_context(running_stack(workdir))
            s3 = cleanup.enter_context(s3_server()) if "s3" in archives else None
            results: list[list[ImportResult]] = []
            for size in sizes:
                rounds: dict[str, list[tuple[ImportResult, MirrorResult | None]]] = {
                    archive: [] for archive in archives
                }
                for round_number in range(args.repeat):
                    print(f"mailbox of {size:,} messages, round {round_number + 1}/{args.repeat}:")
                    email = seed_mailbox(dovecot, size)
                    print_file_creation(workdir / f"probe-{email.split('@')[0]}")
                    profile = args.py_spy if round_number == 0 else None
                    mirror = None
                    for archive in archives:
                        moto_before = s3.cpu_seconds() if s3 is not None else 0.0
                        result = run_import(
                            stack,
                            dovecot,
                            email,
                            size,
                            secure=secure,
                            profile=profile if archive == archives[0] else None,
                            s3=s3 if archive == "s3" else None,
                        )
                        print_import(result, archive)
                        if s3 is not None and archive == "s3":
                            print_moto_share(s3.cpu_seconds() - moto_before, result.seconds)
                        if profile and archive == archives[0]:
                            print(f"  profile of the worker: {profile}")
                        if mirror is None and not args.compare_rss and not args.no_mbsync:
                            mirror = run_mbsync(dovecot, email, size, workdir, secure=secure)
                        if mirror is not None:
                            print_mirror(mirror, result)
                        rounds[archive].append((result, mirror))
                    if args.phases and round_number == 0:
                        print_phases(
                            measure_phases(
                                stack,
                                dovecot,
                                email,
                                rounds[archives[0]][-1][0].source_id,
                                secure=secure,
                            )
                        )
                for archive, archive_rounds in rounds.items():
                    if len(archive_rounds) > 1:
                        print_medians(archive_rounds, archive)
                results.append([result for result, _ in rounds[archives[0]]])
            if len(results) > 1:
                _print_rss_comparison(results)
    except BenchFailed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        print(f"logs in {workdir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    if not args.keep:
        # Only now: deleting a round's files made the next round slower on this
        # machine's ext4 (no journal), where creating a file can cost up to 0.7 ms
        # of kernel time depending on what happened nearby (docs/benchmarks.md).
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _print_rss_comparison(results: list[list[ImportResult]]) -> None:
    """The highest peak of each size's rounds, and its median rate."""
    print("worker peak RSS by mailbox size (highest VmHWM of the rounds):")
    peaks = [max(r.worker_peak_kib for r in rounds) for rounds in results]
    for rounds, peak in zip(results, peaks, strict=True):
        first = rounds[0]
        rate = statistics.median(r.rate for r in rounds)
        print(
            f"  {first.messages:>8,} messages ({first.size_bytes / MB:6.1f} MB): "
            f"{peak / 1024:6.1f} MiB, {rate:,.0f} messages/s"
        )
    ratio = results[-1][0].messages / results[0][0].messages
    print(f"  {ratio:.0f}x the messages, {peaks[-1] / max(peaks[0], 1):.2f}x the peak RSS")


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
