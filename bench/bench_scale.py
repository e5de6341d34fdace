"""Scale-out benchmark: many IMAP mailboxes imported with 1, 2 and 4 worker processes.

What runs (all on this machine):

- a real Dovecot (tests/support/dovecot.py) with M users, each INBOX holding K
  messages (the SpamAssassin ham corpus repeated, each copy unique, as in
  bench_imap), written straight into the Maildirs;
- a PostgreSQL database and a Redis namespace of this run's own, the gRPC server in
  this process, Envoy in front of it (bench_imap's `running_stack`);
- for each round, ONE `ingestion-grpc worker --processes P --threads T` (the
  subcommand a worker node runs; T = 1 by default, so P is the number of mailboxes
  imported at once) with a fresh DATA_DIR (a new archive).

Timed: from the first of M `POST /v1/ingestion-sources` (generic_imap, one source
per mailbox) until every source is `active`. The round fails unless each source has
one completed import of exactly K archived messages and `archived_emails` holds
M x K rows.

Printed for each round: messages/s, the speed-up over one process and the
efficiency against linear (speed-up / P), the CPU seconds every worker process used
(and per message), and how busy the whole machine was. On a machine with fewer
CPUs than P the speed-up cannot exceed the CPU count (the server, PostgreSQL and
Dovecot share them too): the bench says so, and the per-process CPU figures tell
what a bigger machine would do.

    .venv/bin/python bench/bench_scale.py                               # 32 x 2,000
    .venv/bin/python bench/bench_scale.py --mailboxes 8 --per-mailbox 500
    .venv/bin/python bench/bench_scale.py --processes 1,2,4,8 --threads 2

`make bench-scale MAILBOXES=8 PER_MAILBOX=500` does the same. Results:
docs/benchmarks-scale.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg

# bench_imap puts the repository root on sys.path (for `tests.support`) on import.
from bench_google import _cpu, _machine_ticks
from bench_imap import WORKER_READY, BenchFailed, Stack, bench_messages, running_stack
from tests.support.dovecot import Dovecot

CLI = str(Path(sys.executable).parent / "ingestion-grpc")
POLL_SECONDS = 0.1


@dataclass
class Round:
    processes: int
    threads: int
    messages: int
    seconds: float
    # CPU seconds of each worker process during the import.
    process_cpu: list[float]
    # CPU seconds of this process: the gRPC server (and the polling).
    server_cpu: float
    # How busy the whole machine was, 0 to 1 (all CPUs, any process).
    machine_busy: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


class ScaleWorker:
    """`ingestion-grpc worker --processes P --threads T` in a process group of its own."""

    def __init__(self, environment: dict[str, str], log_path: Path, processes: int, threads: int):
        self.log_path = log_path
        self.processes = processes
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [CLI, "worker", "--processes", str(processes), "--threads", str(threads)],
                env={**os.environ, **environment, "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def children(self) -> list[int]:
        with open(f"/proc/{self.process.pid}/task/{self.process.pid}/children") as handle:
            return [int(pid) for pid in handle.read().split()]

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while min(self.log().count(WORKER_READY), len(self.children())) < self.processes:
            if self.process.poll() is not None:
                raise BenchFailed(f"the worker exited at start:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise BenchFailed(f"the worker was not ready in {timeout:g} s:\n{self.log()}")
            time.sleep(0.1)

    def cpu(self) -> dict[int, float]:
        return {pid: _cpu(pid) for pid in self.children()}

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def seed(dovecot: Dovecot, mailboxes: int, per_mailbox: int, tag: str) -> list[str]:
    started = time.monotonic()
    emails = [dovecot.new_user(f"scale-{tag}") for _ in range(mailboxes)]
    for email in emails:
        dovecot.fill_inbox(email, bench_messages(per_mailbox, email.split("@")[0]))
        # Indexed now, not while timed; and checked.
        held = dovecot.status(email, "INBOX")["messages"]
        if held != per_mailbox:
            raise BenchFailed(f"{email}: Dovecot holds {held} messages, expected {per_mailbox}")
    print(
        f"  seeded {mailboxes} mailboxes x {per_mailbox:,} messages in "
        f"{time.monotonic() - started:.1f} s"
    )
    return emails


def _settled(stack: Stack, source_ids: list[str]) -> dict[str, int]:
    with psycopg.connect(stack.database_url) as db:
        rows = db.execute(
            "SELECT status, count(*) FROM ingestion_sources WHERE id = ANY(%s) GROUP BY status",
            (source_ids,),
        ).fetchall()
    return {str(status): int(count) for status, count in rows}


def _check(stack: Stack, source_ids: list[str], per_mailbox: int) -> None:
    with psycopg.connect(stack.database_url) as db:
        complete = db.execute(
            "SELECT count(*) FROM sync_sessions WHERE source_id = ANY(%s) AND kind = 'import' "
            "AND status = 'completed' AND messages_archived = %s",
            (source_ids, per_mailbox),
        ).fetchone()
        rows = db.execute(
            "SELECT count(*) FROM archived_emails WHERE source_id = ANY(%s)", (source_ids,)
        ).fetchone()
    assert complete is not None and rows is not None
    if complete[0] != len(source_ids) or rows[0] != len(source_ids) * per_mailbox:
        raise BenchFailed(
            f"{complete[0]} of {len(source_ids)} sources have one completed import of "
            f"{per_mailbox:,}; archived_emails holds {rows[0]:,} rows, expected "
            f"{len(source_ids) * per_mailbox:,}"
        )


def run_round(
    stack: Stack,
    dovecot: Dovecot,
    *,
    mailboxes: int,
    per_mailbox: int,
    processes: int,
    threads: int,
) -> Round:
    tag = f"p{processes}"
    emails = seed(dovecot, mailboxes, per_mailbox, tag)
    environment = {**stack.environment, "DATA_DIR": str(stack.workdir / f"data-{tag}")}
    worker = ScaleWorker(environment, stack.workdir / f"worker-{tag}.log", processes, threads)
    try:
        worker.wait_ready()
        cpu_before, server_before = worker.cpu(), _cpu()
        busy, ticks = _machine_ticks()
        os.sync()
        started = time.monotonic()
        source_ids = []
        for email in emails:
            created = stack.http.post(
                f"{stack.base_url}/v1/ingestion-sources",
                json={
                    "name": email,
                    "provider": "generic_imap",
                    "providerConfig": dovecot.provider_config(
                        email, secure=True, allow_insecure_cert=True
                    ),
                },
                timeout=60,
            )
            if created.status_code != 201:
                raise BenchFailed(f"creating a source failed: {created.status_code} {created.text}")
            source_ids.append(created.json()["id"])
        deadline = started + max(600.0, mailboxes * per_mailbox / 20)
        while (states := _settled(stack, source_ids)).get("active", 0) < mailboxes:
            if set(states) - {"active", "importing"}:
                raise BenchFailed(f"a source ended otherwise than active: {states}")
            if worker.process.poll() is not None:
                raise BenchFailed(f"the worker died:\n{worker.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise BenchFailed(f"the imports did not finish in time: {states}")
            time.sleep(POLL_SECONDS)
        seconds = time.monotonic() - started
        cpu_after, server_after = worker.cpu(), _cpu()
        busy_after, ticks_after = _machine_ticks()
    finally:
        worker.stop()
    _check(stack, source_ids, per_mailbox)
    return Round(
        processes=processes,
        threads=threads,
        messages=mailboxes * per_mailbox,
        seconds=seconds,
        process_cpu=[cpu_after[pid] - cpu_before.get(pid, 0.0) for pid in sorted(cpu_after)],
        server_cpu=server_after - server_before,
        machine_busy=(busy_after - busy) / max(1, ticks_after - ticks),
    )


def speedup(one: Round, base: Round) -> float:
    """How many times one worker process's rate (the base round's, per process)."""
    return one.rate / base.rate * base.processes


def print_round(one: Round, base: Round | None) -> None:
    cpus = os.cpu_count() or 1
    line = f"  {one.messages:,} messages in {one.seconds:.1f} s: {one.rate:,.0f} messages/s"
    if base is not None:
        times = speedup(one, base)
        possible = min(one.processes, cpus)
        line += (
            f"; {times:.2f}x one process, efficiency against linear "
            f"{times / one.processes:.2f} (against the {possible} CPUs it can use: "
            f"{times / possible:.2f})"
        )
    print(line)
    per_process = ", ".join(f"{seconds:.1f}" for seconds in one.process_cpu)
    total = sum(one.process_cpu)
    print(
        f"  CPU of the {one.processes} worker processes: {per_process} s "
        f"({1e3 * total / one.messages:.2f} ms a message, {100 * total / one.seconds:.0f} % "
        f"of a CPU); the gRPC server (this process) {one.server_cpu:.1f} s; the machine was "
        f"{100 * one.machine_busy:.0f} % busy (all {cpus} CPUs, any process)"
    )


def print_summary(rounds: Sequence[Round]) -> None:
    cpus = os.cpu_count() or 1
    base = rounds[0]
    print("summary (processes: messages/s, speed-up, efficiency against linear):")
    for one in rounds:
        times = speedup(one, base)
        print(
            f"  {one.processes:>2} x {one.threads} thread(s): {one.rate:>8,.0f} messages/s, "
            f"{times:.2f}x, {times / one.processes:.2f}"
        )
    if any(one.processes > cpus for one in rounds):
        print(
            f"  this machine has {cpus} CPUs: with more worker processes than that the "
            f"speed-up cannot exceed {cpus}x (the server, PostgreSQL and Dovecot use the same "
            "CPUs). The CPU a message costs each process (above) is what to multiply out "
            "for a bigger machine."
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mailboxes", type=int, default=32, help="IMAP mailboxes (sources)")
    parser.add_argument("--per-mailbox", type=int, default=2000, help="messages in each")
    parser.add_argument(
        "--processes", default="1,2,4", help="worker processes of each round (default 1,2,4)"
    )
    parser.add_argument("--threads", type=int, default=1, help="threads per worker process")
    parser.add_argument("--workdir", type=Path, help="where data and logs go (default: /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = [int(p) for p in args.processes.split(",")]
    signal.signal(signal.SIGTERM, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.workdir))
    workdir.chmod(0o755)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"scale-out benchmark: {args.mailboxes} IMAP mailboxes x {args.per_mailbox:,} messages, "
        f"worker processes {', '.join(map(str, counts))} x {args.threads} thread(s); "
        f"{os.cpu_count()} CPUs, load average {load} (other work on the machine skews every "
        "figure)"
    )
    print(f"  workdir {workdir}")
    rounds: list[Round] = []
    try:
        with Dovecot() as dovecot, running_stack(workdir) as stack:
            for processes in counts:
                print(f"{processes} worker process(es):")
                one = run_round(
                    stack,
                    dovecot,
                    mailboxes=args.mailboxes,
                    per_mailbox=args.per_mailbox,
                    processes=processes,
                    threads=args.threads,
                )
                print_round(one, rounds[0] if rounds else None)
                rounds.append(one)
        print_summary(rounds)
    except BenchFailed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        print(f"logs in {workdir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
