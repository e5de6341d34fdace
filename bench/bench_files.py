"""File import benchmark: one big mbox through the real stack, next to the least work
any importer must do; and the Enron PST next to Debian's `readpst -e`.

What runs (all on this machine):

- an mbox of `--size` bytes (default 1 GiB) written into this run's IMPORT_ROOT: the
  SpamAssassin ham corpus repeated, every copy's Message-ID made unique (`<cN.…>`), so
  that every message is new to the archive;
- a PostgreSQL database and a Redis namespace of this run's own (dropped / cleaned at
  the end), the gRPC server in this process, Envoy in front of it (bench_imap.py's
  stack), and ONE Dramatiq worker subprocess, `--processes 1 --threads 1`.

Timed, ours: `POST /v1/ingestion-sources` (mbox_import, localFilePath) until `GET` says
the source is `imported`. The run must say exactly N fetched and archived, and the
archive's rows must hold exactly the bytes the baseline read, or the run fails.
Printed: messages/s, MB/s (of message bytes) and the peak RSS (VmHWM) of the Dramatiq
worker process that ran the import.

Timed, the baseline ("least work"): Python's `mailbox.mbox` reading every message
(`get_bytes`), SHA-256 of it, and a file of its own, named by the digest, in one
folder. Durable as ours is: every file and its name on disk before the next batch of
500 (our batch) begins. Three ways, all printed:

- `fsync each` (the reference): write the file, fsync it, next message; the folder
  fsync'd once per batch. The plain program anyone would write;
- `16 fsyncs at once`: 500 files written, then fsync'd by 16 threads, then the folder:
  what our blob store did before it used syncfs;
- `one syncfs a batch`: 500 files written, then one syncfs(2): what our blob store
  does on Linux; the same durability with the same trick, the strictest comparison.

Then enron.pst: created as a pst_import source and timed until `imported`, its reading
and MIME rebuilding alone (the provider in this process), and `readpst -e` (pst-utils,
no fsync) into an empty folder, median of 5.

    .venv/bin/python bench/bench_files.py                  # 1 GiB mbox
    .venv/bin/python bench/bench_files.py --size 100M
    .venv/bin/python bench/bench_files.py --size 100M --py-spy prof.txt   # + where the
                                                         # worker's time goes, by step
    .venv/bin/python bench/bench_files.py --size 100M --archive both --repeat 3

`--archive s3` imports the mbox into the S3 blob store (ARCHIVE_URL on a new bucket of
a local moto_server, tests/support/s3.py, per import), `--archive both` into each
store, their figures side by side; `--repeat` imports it that many times (a new
source and an empty store each time) and prints the medians. moto is a Python server
on the same cores: S3 figures are our client against moto here, not AWS or MinIO.

`make bench-files SIZE=100M` does the same. Results: docs/benchmarks-files.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import mailbox
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# bench_imap puts the repository root on sys.path (for `tests.support`) on import.
from bench_imap import (
    MB,
    BenchFailed,
    ImportResult,
    Stack,
    Worker,
    print_moto_share,
    running_stack,
    timed_import,
)
from ingestion_grpc.config import parse_size
from ingestion_grpc.providers.base import ProviderEnvironment
from ingestion_grpc.providers.pst import PstImport
from tests.support.corpora import ENRON_PST, HAM, mbox_messages
from tests.support.fetch_context import NO_CONTEXT
from tests.support.s3 import s3_server

BATCH = 500  # the engine's batch (providers.files.MAX_BATCH_MESSAGES)
FSYNC_THREADS = 16  # as archive.blobstore._SYNC_THREADS
FROM_LINE = b"From bench@example.com Sat Jan  1 00:00:00 2000\n"
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*<?", re.IGNORECASE | re.MULTILINE)


# -- the mbox ---------------------------------------------------------------------------


def _copyable(raw: bytes) -> tuple[bytes, bytes]:
    """(head, tail): a copy is head + b"cN." + tail, a new Message-ID for each N.

    The id is changed where it stands in the header block; a message without one
    gets one in front."""
    header_end = raw.find(b"\n\n")
    found = _MESSAGE_ID.search(raw, 0, header_end if header_end != -1 else len(raw))
    if found is None:
        return b"Message-ID: <", b"no-id@bench.invalid>\n" + raw
    return raw[: found.end()], raw[found.end() :]


def write_mbox(path: Path, size: int) -> tuple[int, int]:
    """An mbox of at least `size` bytes; (messages, bytes of the file)."""
    pieces = [_copyable(raw) for raw in mbox_messages(HAM)]
    count = written = copy = 0
    with path.open("wb", buffering=4 * 1024 * 1024) as out:
        while written < size:
            tag = b"c%d." % copy
            for head, tail in pieces:
                for part in (FROM_LINE, head, tag, tail, b"\n"):
                    out.write(part)
                    written += len(part)
                count += 1
                if written >= size:
                    break
            copy += 1
    return count, written


# -- ours -----------------------------------------------------------------------------------


def import_through_stack(
    stack: Stack,
    provider: str,
    path: Path,
    expected: int,
    *,
    profile: Path | None = None,
    environment: dict[str, str] | None = None,
    log_name: str = "",
) -> ImportResult:
    """Import the file through the stack until the source is `imported`; `environment`
    adds to the worker's (another ARCHIVE_URL)."""
    return timed_import(
        stack,
        Worker(
            {**stack.environment, **(environment or {})},
            stack.workdir / f"worker-{log_name or provider}.log",
        ),
        {"name": path.name, "provider": provider, "providerConfig": {"localFilePath": path.name}},
        expected,
        settled="imported",
        timeout=max(600.0, expected / 50),
        profile=profile,
    )


# -- the baseline ---------------------------------------------------------------------------


@dataclass
class Baseline:
    label: str
    messages: int
    message_bytes: int
    seconds: float


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(folder: Path, raw: bytes) -> int:
    """A new file named by the SHA-256 of `raw`, written whole; its descriptor."""
    fd = os.open(folder / hashlib.sha256(raw).hexdigest(), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    view = memoryview(raw)
    while view:
        view = view[os.write(fd, view) :]
    return fd


# How the baseline makes each batch of BATCH files durable (see the module docstring).
FSYNC_EACH = "fsync each"
FSYNC_PARALLEL = f"{FSYNC_THREADS} fsyncs at once"
SYNCFS = "one syncfs a batch"
BARRIERS = (FSYNC_EACH, FSYNC_PARALLEL, SYNCFS)


def _syncfs(folder: Path) -> None:
    """Linux's syncfs(2) on the file system holding `folder`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed")
    finally:
        os.close(fd)


def baseline(path: Path, folder: Path, barrier: str) -> Baseline:
    """mailbox.mbox -> get_bytes -> SHA-256 -> one file each in one folder; each batch
    of BATCH files (and the last) made durable with the files' names, by `barrier`."""
    folder.mkdir()
    os.sync()
    started = time.monotonic()
    box = mailbox.mbox(path, create=False)
    count = size = 0
    pending: list[int] = []
    with ThreadPoolExecutor(FSYNC_THREADS) as pool:

        def flush() -> None:
            if barrier == FSYNC_PARALLEL:
                list(pool.map(os.fsync, pending))
            for fd in pending:
                os.close(fd)
            pending.clear()
            if barrier == SYNCFS:
                _syncfs(folder)
            else:
                _fsync_path(folder)

        try:
            for key in box.iterkeys():
                raw = box.get_bytes(key)
                fd = _write(folder, raw)
                if barrier == FSYNC_EACH:
                    os.fsync(fd)
                pending.append(fd)
                count += 1
                size += len(raw)
                if len(pending) >= BATCH:
                    flush()
            flush()
        finally:
            box.close()
    return Baseline(barrier, count, size, time.monotonic() - started)


# -- PST ----------------------------------------------------------------------------------


def pst_read_alone(path: Path) -> tuple[int, float]:
    """The pst_import provider in this process: every message read and rebuilt."""
    provider = PstImport(
        {"localFilePath": path.name},
        ProviderEnvironment(import_root=path.parent, upload_root=path.parent / "uploads"),
    )
    started = time.monotonic()
    batches = provider.fetch(provider.list_mailboxes()[0], None, NO_CONTEXT)
    count = sum(len(batch.messages) for batch in batches)
    return count, time.monotonic() - started


def readpst(path: Path, workdir: Path, rounds: int = 5) -> tuple[list[int], float]:
    """`readpst -e` into an empty folder: (files written by each round, median seconds)."""
    binary = shutil.which("readpst")
    if binary is None:
        raise BenchFailed("readpst is not installed (apt-get install -y pst-utils)")
    times: list[float] = []
    files: list[int] = []
    for index in range(rounds):
        out = workdir / f"readpst-{index}"
        out.mkdir()
        started = time.monotonic()
        subprocess.run([binary, "-q", "-e", "-o", str(out), str(path)], check=True, timeout=600)
        times.append(time.monotonic() - started)
        files.append(sum(len(names) for _, _, names in os.walk(out)))
        shutil.rmtree(out)
    return files, statistics.median(times)


# -- where the worker's time goes ----------------------------------------------------------

# The engine's threads (engine.mailboxes._ingest, engine.read_ahead, the blob store's
# writers): the frame that marks a sample as one thread's.
THREADS: list[tuple[str, tuple[str, ...]]] = [
    ("ingesting thread (engine.mailboxes._ingest)", ("_ingest",)),
    ("provider reader thread (engine.read_ahead)", ("ReadAhead._read",)),
    ("blob store threads (put_many and its writers)", ("put_many", "_store_all")),
]
# (step, frames that mark it): the first step of a thread whose frames all occur in
# one of its samples takes the sample.
STEPS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    THREADS[0][0]: [
        ("waiting for the batch's blobs to be durable", ("Future.result",)),
        ("waiting for the provider's next batch", ("ReadAhead._consume",)),
        ("catalog: parse metadata", ("record_batch", "parse_metadata")),
        ("catalog INSERT: waiting for PostgreSQL", ("record_batch", "Connection.wait")),
        ("catalog INSERT: rows, JSON, psycopg", ("record_batch",)),
        ("lease, cursor, counters", ("_advance",)),
        ("COMMIT", ("UnitOfWork.commit",)),
    ],
    THREADS[1][0]: [
        ("waiting for the engine to take the batch", ("_hand_over",)),
        ("provider: read and split the mbox", ("_batched",)),
    ],
    THREADS[2][0]: [
        ("syncfs, once per batch", ("_sync_file_system",)),
        ("create the temporary files", ("_create_temporary",)),
        ("write the bytes", ("_write_all",)),
        ("look for the blob (stat)", ("_holds",)),
        ("close and rename", ("_write_file",)),
        ("SHA-256", ("sha256_hex",)),
        ("idle, waiting for a batch or for the writers", ("wait",)),
    ],
}


def summarize_profile(path: Path) -> None:
    """Share of each engine thread's samples per step, from `py-spy record --idle
    --format raw` output (idle samples count: they are fsync and PostgreSQL waits)."""
    counts = {
        thread: dict.fromkeys([*(n for n, _ in STEPS[thread]), "other"], 0) for thread in STEPS
    }
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [frame.split(" (")[0] for frame in stack.split(";")]
        # a mark names a function (`put_many`) or a method (`Connection.wait`)
        inside = {*frames, *(frame.rpartition(".")[2] for frame in frames)}
        thread = next((t for t, marks in THREADS if inside.intersection(marks)), None)
        if thread is None:
            continue
        name = next((n for n, marks in STEPS[thread] if inside.issuperset(marks)), "other")
        counts[thread][name] += int(count)
    for thread, steps in counts.items():
        total = sum(steps.values())
        if not total:
            print(f"                (no samples of the {thread} in the profile)")
            continue
        print(f"                {thread}, {total:,} samples:")
        for name, samples in sorted(steps.items(), key=lambda item: -item[1]):
            if samples:
                print(f"                  {100 * samples / total:5.1f} %  {name}")


# -- main -----------------------------------------------------------------------------------


def rate(messages: int, size: int, seconds: float) -> str:
    return f"{messages / seconds:,.0f} messages/s, {size / MB / seconds:.1f} MB/s"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size", default="1G", help="size of the mbox: 100M, 1G, ... (powers of 1024; 1G)"
    )
    parser.add_argument("--no-pst", action="store_true", help="skip the PST comparison")
    parser.add_argument(
        "--archive",
        choices=("local", "s3", "both"),
        default="local",
        help="the blob store the mbox import writes to: local files (default), S3 (a "
        "local moto_server), or both, side by side",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="mbox imports per store; medians printed (1)"
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="FILE",
        help="profile the worker during the mbox import (.svg flamegraph, .json "
        "speedscope, else raw collapsed stacks, then summarized by step); needs py-spy",
    )
    parser.add_argument(
        "--workdir", type=Path, help="where the files, data and logs go (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the workdir (logs) at the end")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def print_mbox_import(ours: ImportResult, archive: str) -> None:
    label = "mbox, ours:" if archive == "local" else f"mbox, ours, {archive} archive:"
    print(
        f"{label:<15} {ours.messages:,} messages, {ours.size_bytes / MB:,.1f} MB "
        f"in {ours.seconds:.1f} s: {rate(ours.messages, ours.size_bytes, ours.seconds)}"
    )
    print(
        f"                worker process peak RSS {ours.worker_peak_kib / 1024:.1f} MiB "
        f"(VmHWM; sampled max {ours.worker_sampled_kib / 1024:.1f} MiB)"
    )


def median_import(results: list[ImportResult]) -> ImportResult:
    """The round of median time (an odd count; the lower middle one otherwise)."""
    return sorted(results, key=lambda r: r.seconds)[(len(results) - 1) // 2]


@contextlib.contextmanager
def _workdir(parent: Path | None, keep: bool) -> Iterator[Path]:
    """A new folder, removed at the end unless `keep`; kept (for its logs) on failure."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-files-", dir=parent))
    workdir.chmod(0o755)
    try:
        yield workdir
    except BenchFailed:
        shutil.rmtree(workdir / "data" / "imports", ignore_errors=True)  # the big file
        print(f"logs in {workdir}", file=sys.stderr)
        raise
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = parse_size(args.size, "--size")
    signal.signal(signal.SIGTERM, _raise_interrupt)  # make interrupted: clean up
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"File import benchmark: mbox of {size / MB:,.0f} MB, {os.cpu_count()} CPUs, "
        f"load average {load} (other work on the machine skews every figure)"
    )
    archives = ["local", "s3"] if args.archive == "both" else [args.archive]
    try:
        with contextlib.ExitStack() as cleanup:
            workdir = cleanup.enter_context(_workdir(args.workdir, args.keep))
            stack = cleanup.enter_context(running_stack(workdir))
            s3 = cleanup.enter_context(s3_server()) if "s3" in archives else None
            print(f"  workdir {workdir}")
            imports = workdir / "data" / "imports"  # IMPORT_ROOT (DATA_DIR/imports)
            imports.mkdir(parents=True, exist_ok=True)
            mbox = imports / "bench.mbox"
            started = time.monotonic()
            count, file_bytes = write_mbox(mbox, size)
            print(
                f"  wrote {mbox.name}: {count:,} messages, {file_bytes / MB:,.1f} MB "
                f"in {time.monotonic() - started:.1f} s"
            )

            results: dict[str, list[ImportResult]] = {archive: [] for archive in archives}
            for round_number in range(args.repeat):
                for archive in archives:
                    profile = args.py_spy if round_number == 0 and archive == archives[0] else None
                    environment = {}
                    if s3 is not None and archive == "s3":
                        environment = s3.new_archive().environment
                    moto_before = s3.cpu_seconds() if s3 is not None else 0.0
                    ours = import_through_stack(
                        stack,
                        "mbox_import",
                        mbox,
                        count,
                        profile=profile,
                        environment=environment,
                        log_name=f"mbox-{archive}-{round_number + 1}",
                    )
                    print_mbox_import(ours, archive)
                    if s3 is not None and archive == "s3":
                        print(" " * 6, end="")
                        print_moto_share(s3.cpu_seconds() - moto_before, ours.seconds)
                    if profile:
                        print(f"                profile of the worker: {profile}")
                        if profile.suffix not in (".svg", ".json"):
                            summarize_profile(profile)
                    # Free the disk; the next round starts from an empty store.
                    shutil.rmtree(workdir / "data" / "blobs", ignore_errors=True)
                    results[archive].append(ours)
            if args.repeat > 1:
                for archive, rounds in results.items():
                    middle = median_import(rounds)
                    figures = rate(middle.messages, middle.size_bytes, middle.seconds)
                    print(
                        f"median of {args.repeat} rounds ({archive} archive): "
                        f"{middle.seconds:.1f} s, {figures}"
                    )
            ours = median_import(results[archives[0]])

            for index, barrier in enumerate(BARRIERS):
                folder = workdir / f"baseline-{index}"
                base = baseline(mbox, folder, barrier)
                shutil.rmtree(folder, ignore_errors=True)
                if (base.messages, base.message_bytes) != (ours.messages, ours.size_bytes):
                    raise BenchFailed(
                        f"the baseline read {base.messages:,} messages, {base.message_bytes:,} "
                        f"bytes; the archive holds {ours.messages:,}, {ours.size_bytes:,}"
                    )
                ratio = (ours.messages / ours.seconds) / (base.messages / base.seconds)
                print(
                    f"mbox, baseline ({base.label}): {base.seconds:.1f} s: "
                    f"{rate(base.messages, base.message_bytes, base.seconds)}; "
                    f"ours / baseline {ratio:.2f}x"
                )

            if not args.no_pst:
                pst = imports / ENRON_PST.name
                shutil.copyfile(ENRON_PST, pst)
                alone_count, alone_seconds = pst_read_alone(pst)
                pst_ours = import_through_stack(stack, "pst_import", pst, alone_count)
                files, readpst_seconds = readpst(pst, workdir)
                print(
                    f"enron.pst, ours: {pst_ours.messages} messages in {pst_ours.seconds:.2f} s "
                    f"through the stack (worker start excluded); reading and rebuilding alone "
                    f"{alone_seconds:.2f} s"
                )
                counts = f"{files[0]}" if len(set(files)) == 1 else f"{files} (per round!)"
                print(
                    f"enron.pst, readpst -e: {counts} files in {readpst_seconds:.2f} s "
                    f"(median of {len(files)}, no fsync); ours / readpst "
                    f"{readpst_seconds / pst_ours.seconds:.2f}x the rate"
                )
    except BenchFailed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    return 0


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
