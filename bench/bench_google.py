"""Google Workspace import benchmark: a domain of U users x M messages through the
whole stack, against a local fake of Google that enforces Gmail's per-user quota.

What runs (all on this machine):

- the fake of Google's token endpoint, Directory and Gmail (tests/support/fake_google.py)
  in a process of its own, so that serving the requests does not take the client's
  CPU (in one process with the client it did ~450 messages/s). It enforces the
  per-user quota as Google does: 250 units/s (a bucket of one second's worth), with
  Gmail's costs (messages.get 5, messages.list 5, history.list 2, getProfile 1,
  labels.list 1), and answers 429 when a user's calls exceed it. Every call takes
  `--latency` seconds (default 0.05), as over a network. Each user's INBOX holds M
  messages of the SpamAssassin ham corpus, each copy made unique by a header;
- a PostgreSQL database and a Redis namespace of this run's own, the gRPC server in
  this process, Envoy in front of it (bench_imap's `running_stack`);
- P Dramatiq worker processes (1, 2 and 4 by default), each `--threads T` (default 4,
  as `make run` starts its worker; 0: as many as it takes for every user to be read
  at once), all sharing the engine's rate limits in Redis, and one DATA_DIR per
  round. Each takes at most T jobs at once (the workers' `dramatiq_queue_prefetch`,
  see `jobs/worker.py`).

Timed: `POST /v1/ingestion-sources` (google_workspace, maxConcurrentMailboxes = U)
until `GET` says `active`. The run fails unless the sync session says exactly U x M
fetched and archived, `archived_emails` holds them, and the fake served exactly one
successful messages.get per message.

The ceiling is what Gmail allows: the users read in parallel (min(U, P x T)) times
50 messages/s (250 units/s / 5 units a message). Targets: at least 0.85 of it, and
fewer than 1 % of our requests answered 429.

    .venv/bin/python bench/bench_google.py                          # 16 x 1,000; 1, 2, 4 workers
    .venv/bin/python bench/bench_google.py --threads 0              # every user at once, each
    .venv/bin/python bench/bench_google.py --processes 4 --repeat 1
    .venv/bin/python bench/bench_google.py --users 2 --compare-rss 1000,10000
    .venv/bin/python bench/bench_google.py --processes 1 --py-spy prof.txt

`make bench-google USERS=16 PER_USER=1000 ARGS='--repeat 3'` does the same. Results:
docs/benchmarks-google.md.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# bench_imap puts the repository root on sys.path (for `tests.support`) on import.
from bench_imap import (
    MB,
    BenchFailed,
    ImportResult,
    Stack,
    Worker,
    bench_messages,
    running_stack,
    timed_import,
)
from tests.support.fake_google import FakeGoogle

PROVIDER = "google_workspace"
# Gmail's per-user quota and the cost of one messages.get: 50 messages/s a user.
USER_UNITS_PER_SECOND = 250.0
GET_COST = 5.0
PER_USER_CEILING = USER_UNITS_PER_SECOND / GET_COST
TARGET_RATIO = 0.85
TARGET_THROTTLED = 0.01
TICKS = os.sysconf("SC_CLK_TCK")


# -- the fake, in a process of its own ------------------------------------------------


@dataclass(frozen=True)
class Domain:
    key_json: str
    admin: str
    users: list[str]


@dataclass(frozen=True)
class Counters:
    """What the fake answered so far (all users), and its process's CPU time."""

    requests: int
    throttled: int
    answered: dict[tuple[str, int], int]
    cpu_seconds: float
    peak_in_flight: int = 0


def _serve_fake(conn: multiprocessing.connection.Connection, latency: float) -> None:
    """The fake's process: serve, and answer the parent's commands on `conn`.

    Replies are plain tuples: this module runs as `__mp_main__` here, so its classes
    would not unpickle in the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # Pages as large as Google's (500 ids a page): the client's page size rules.
    fake = FakeGoogle(
        quota=True,
        rate=USER_UNITS_PER_SECOND,
        burst=USER_UNITS_PER_SECOND,
        page_size=500,
        users_page_size=500,
        history_page_size=500,
        latency=latency,
        keep_log=False,
    ).start()
    key = fake.new_key()
    conn.send(fake.url)
    while True:
        command, *args = conn.recv()
        if command == "seed":
            users, per_user, tag = args
            admin = f"admin@{tag}.bench.example"
            fake.add_user(admin, admin=True)
            emails = [f"user{n:03d}@{tag}.bench.example" for n in range(users)]
            for n, email in enumerate(emails):
                fake.add_user(email)
                fake.add_messages(email, bench_messages(per_user, f"{tag}-{n}"))
            conn.send((key.json, admin, emails))
        elif command == "counters":
            peak = max((fake.user(e).peak_in_flight for e in args[0]), default=0)
            conn.send((fake.requests, fake.throttled, dict(fake.answered), _cpu(), peak))
        elif command == "forget":
            fake.remove_users(args[0])
            conn.send(None)
        else:
            break
    fake.close()


def _cpu(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class MeteredWorker(Worker):
    """bench_imap's worker, which also notes the CPU time its processes spent from
    the moment it was ready (its start-up, imports mostly, is not the import's)."""

    cpu_seconds = 0.0
    _cpu_when_ready = 0.0

    def start(self, timeout: float = 60.0) -> MeteredWorker:
        super().start(timeout)
        self._cpu_when_ready = self._children_cpu()
        return self

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.cpu_seconds = self._children_cpu() - self._cpu_when_ready
        super().stop()

    def _children_cpu(self) -> float:
        return sum(_cpu(child) for child in self.children())


class FakeProcess:
    """FakeGoogle serving from a child process, driven over a pipe."""

    def __init__(self, latency: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(
            target=_serve_fake, args=(child, latency), name="fake-google", daemon=True
        )
        self.process.start()
        if not self._conn.poll(60):
            raise BenchFailed("the fake of Google did not start in 60 s")
        self.url: str = self._conn.recv()

    def _ask(self, *command: Any) -> Any:
        self._conn.send(command)
        if not self._conn.poll(600):
            raise BenchFailed(f"the fake of Google did not answer {command[0]!r}")
        return self._conn.recv()

    def seed(self, users: int, per_user: int, tag: str) -> Domain:
        return Domain(*self._ask("seed", users, per_user, tag))

    def counters(self, users: list[str]) -> Counters:
        return Counters(*self._ask("counters", users))

    def forget(self, users: list[str]) -> None:
        self._ask("forget", users)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(("close",))
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


# -- one round ---------------------------------------------------------------------------


@dataclass
class Round:
    result: ImportResult
    processes: int
    threads: int
    parallel: int
    requests: int
    throttled: int
    fake_cpu: float
    peak_in_flight: int
    # CPU seconds of the worker processes, and how busy the whole machine was (0 to 1).
    workers_cpu: float
    machine_busy: float

    @property
    def ceiling(self) -> float:
        return self.parallel * PER_USER_CEILING

    @property
    def ratio(self) -> float:
        return self.result.rate / self.ceiling

    @property
    def throttled_share(self) -> float:
        return self.throttled / self.requests if self.requests else 0.0


def run_round(
    stack: Stack,
    fake: FakeProcess,
    *,
    users: int,
    per_user: int,
    processes: int,
    threads: int,
    tag: str,
    profile: Path | None,
    user_rate: float | None = None,
) -> Round:
    """Seed a new domain, import it with `processes` fresh workers, check the fake's side."""
    started = time.monotonic()
    domain = fake.seed(users, per_user, tag)
    expected = users * per_user
    print(f"  seeded {users} users x {per_user:,} messages in {time.monotonic() - started:.1f} s")
    environment = {
        **stack.environment,
        # One blob store per round, shared by the round's workers: a fresh archive.
        "DATA_DIR": str(stack.workdir / f"data-{tag}"),
    }
    if user_rate is not None:
        # Our side's per-user rate, set apart from Google's (the fake's stays 250).
        environment["LIMIT_GMAIL_USER"] = f"{user_rate:g}"
    workers = [
        MeteredWorker(environment, stack.workdir / f"worker-{tag}-{n}.log", threads=threads)
        for n in range(processes)
    ]
    config = {
        "serviceAccountKeyJson": domain.key_json,
        "impersonatedAdminEmail": domain.admin,
        "excludeUsers": ["admin@*"],
        # The engine's default (8) would cap the users read at once below the workers'.
        "maxConcurrentMailboxes": users,
    }
    before = fake.counters(domain.users)
    busy, ticks = _machine_ticks()
    result = timed_import(
        stack,
        workers,
        {"name": f"google {tag}", "provider": PROVIDER, "providerConfig": config},
        expected,
        settled="active",
        timeout=max(600.0, 10 * expected / PER_USER_CEILING / min(users, processes * threads)),
        profile=profile,
    )
    after = fake.counters(domain.users)
    busy_after, ticks_after = _machine_ticks()
    fake.forget([domain.admin, *domain.users])
    downloads = after.answered.get(("messages.get", 200), 0) - before.answered.get(
        ("messages.get", 200), 0
    )
    if downloads != expected:
        raise BenchFailed(f"the fake served {downloads:,} messages, expected {expected:,}")
    return Round(
        result,
        processes,
        threads,
        parallel=min(users, processes * threads),
        requests=after.requests - before.requests,
        throttled=after.throttled - before.throttled,
        fake_cpu=after.cpu_seconds - before.cpu_seconds,
        peak_in_flight=after.peak_in_flight,
        workers_cpu=sum(w.cpu_seconds for w in workers),
        machine_busy=(busy_after - busy) / max(1, ticks_after - ticks),
    )


# -- reporting ----------------------------------------------------------------------------


def print_round(one: Round) -> None:
    result = one.result
    print(
        f"  {result.messages:,} messages ({result.size_bytes / MB:.1f} MB) in "
        f"{result.seconds:.1f} s: {result.rate:,.0f} messages/s; ceiling "
        f"{one.parallel} users x {PER_USER_CEILING:g} = {one.ceiling:,.0f} messages/s; "
        f"ours / ceiling {one.ratio:.2f}"
    )
    print(
        f"  429s we caused: {one.throttled:,} of {one.requests:,} requests "
        f"({100 * one.throttled_share:.2f} %); most requests in flight for one user "
        f"{one.peak_in_flight}"
    )
    print(
        f"  worker peak RSS {result.worker_peak_kib / 1024:.1f} MiB (VmHWM, highest of "
        f"{one.processes} worker processes; sampled max {result.worker_sampled_kib / 1024:.1f} "
        f"MiB)"
    )
    print(
        f"  CPU: workers {1e3 * one.workers_cpu / result.messages:.2f} ms a message "
        f"({100 * one.workers_cpu / result.seconds:.0f} % of a CPU), the fake "
        f"{100 * one.fake_cpu / result.seconds:.0f} % of a CPU; the machine was "
        f"{100 * one.machine_busy:.0f} % busy (all {os.cpu_count()} CPUs, any process)"
    )


def print_medians(rounds: list[Round]) -> None:
    first = rounds[0]
    rate = statistics.median(r.result.rate for r in rounds)
    ratio = statistics.median(r.ratio for r in rounds)
    share = statistics.median(r.throttled_share for r in rounds)
    rss = statistics.median(r.result.worker_peak_kib for r in rounds) / 1024
    ratios = ", ".join(f"{r.ratio:.2f}" for r in rounds)
    print(
        f"  median of {len(rounds)}: {rate:,.0f} messages/s, ceiling {first.ceiling:,.0f}, "
        f"ours / ceiling {ratio:.2f} ({ratios}); 429s {100 * share:.2f} % of requests; "
        f"worker peak RSS {rss:.1f} MiB"
    )


def print_summary(configurations: list[list[Round]]) -> None:
    print("summary (medians):")
    print("  workers x threads | messages/s | ceiling | ours/ceiling | 429s    | peak RSS")
    for rounds in configurations:
        first = rounds[0]
        ratio = statistics.median(r.ratio for r in rounds)
        share = statistics.median(r.throttled_share for r in rounds)
        print(
            f"  {first.processes:>7} x {first.threads:<7} | "
            f"{statistics.median(r.result.rate for r in rounds):>10,.0f} | "
            f"{first.ceiling:>7,.0f} | {ratio:>12.2f} | {100 * share:>5.2f} % | "
            f"{statistics.median(r.result.worker_peak_kib for r in rounds) / 1024:>6.1f} MiB"
        )
    ratios = [statistics.median(r.ratio for r in rounds) for rounds in configurations]
    shares = [statistics.median(r.throttled_share for r in rounds) for rounds in configurations]
    print(
        f"  targets: ours / ceiling >= {TARGET_RATIO}: "
        f"{'met' if min(ratios) >= TARGET_RATIO else 'MISSED'} (lowest {min(ratios):.2f}); "
        f"429s < {100 * TARGET_THROTTLED:g} %: "
        f"{'met' if max(shares) < TARGET_THROTTLED else 'MISSED'} "
        f"(highest {100 * max(shares):.2f} %)"
    )


def print_rss_comparison(sizes: list[int], results: list[list[Round]]) -> None:
    print("worker peak RSS by messages a user (highest VmHWM of the rounds):")
    peaks = [max(r.result.worker_peak_kib for r in rounds) for rounds in results]
    for size, rounds, peak in zip(sizes, results, peaks, strict=True):
        rate = statistics.median(r.result.rate for r in rounds)
        megabytes = rounds[0].result.size_bytes / MB
        print(
            f"  {size:>7,} a user ({megabytes:7.1f} MB in all): {peak / 1024:6.1f} MiB, "
            f"{rate:,.0f} messages/s"
        )
    print(
        f"  {sizes[-1] / sizes[0]:.0f}x the messages, "
        f"{peaks[-1] / max(peaks[0], 1):.2f}x the peak RSS"
    )


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--users", type=int, default=16, help="users in the domain (16)")
    parser.add_argument("--per-user", type=int, default=1000, help="messages a user (1000)")
    parser.add_argument(
        "--processes",
        default="1,2,4",
        help="worker process counts to measure, comma-separated (1,2,4)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=4,
        help="threads a worker process (4, as `make run` starts its worker; 0: enough "
        "for every user at once)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds per configuration (3)")
    parser.add_argument(
        "--latency", type=float, default=0.05, help="seconds every Gmail call takes (0.05)"
    )
    parser.add_argument(
        "--user-rate",
        type=float,
        metavar="UNITS",
        help="our per-user quota in units/s (LIMIT_GMAIL_USER; default the declared 250): "
        "above 250 shows what the fake's 429s do",
    )
    parser.add_argument(
        "--compare-rss",
        nargs="?",
        const="1000,10000",
        metavar="SIZES",
        help="import domains of these messages a user (default 1000,10000), with the "
        "first --processes count, and compare the worker's peak RSS",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="FILE",
        help="profile the first worker of the first round (.svg, .json, else raw)",
    )
    parser.add_argument("--workdir", type=Path, help="where data and logs go (a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir at the end")
    args = parser.parse_args(argv)
    args.process_counts = [int(p) for p in str(args.processes).split(",")]
    args.sizes = (
        [int(s) for s in args.compare_rss.split(",")] if args.compare_rss else [args.per_user]
    )
    if min([args.users, args.repeat, *args.process_counts, *args.sizes]) < 1:
        parser.error("--users, --per-user, --processes and --repeat must be at least 1")
    if args.threads < 0:
        parser.error("--threads must be 0 (enough for every user) or more")
    if args.compare_rss:
        args.process_counts = args.process_counts[:1]
    return args


def configurations(args: argparse.Namespace) -> Iterator[tuple[int, int, int]]:
    """(messages a user, worker processes, threads each) to measure, in order."""
    for size in args.sizes:
        for processes in args.process_counts:
            yield size, processes, args.threads or math.ceil(args.users / processes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="bench-google-", dir=args.workdir))
    workdir.chmod(0o755)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"Google Workspace import benchmark: {args.users} users x "
        f"{', '.join(f'{s:,}' for s in args.sizes)} messages, fake latency "
        f"{args.latency * 1000:g} ms, {os.cpu_count()} CPUs, load average {load}"
        + (f", our quota {args.user_rate:g} units/s a user" if args.user_rate else "")
    )
    print(f"  workdir {workdir}")
    results: list[list[Round]] = []
    fake: FakeProcess | None = None
    try:
        fake = FakeProcess(args.latency)
        environment = {"GOOGLE_API_ENDPOINT": fake.url}
        with running_stack(workdir, environment) as stack:
            for size, processes, threads in configurations(args):
                rounds: list[Round] = []
                for number in range(args.repeat):
                    print(
                        f"{processes} worker process(es) x {threads} threads, {args.users} "
                        f"users x {size:,}, round {number + 1}/{args.repeat}:"
                    )
                    profile = args.py_spy if not results and number == 0 else None
                    one = run_round(
                        stack,
                        fake,
                        users=args.users,
                        per_user=size,
                        processes=processes,
                        threads=threads,
                        tag=f"s{size}p{processes}r{number}",
                        profile=profile,
                        user_rate=args.user_rate,
                    )
                    print_round(one)
                    if profile:
                        print(f"  profile of the first worker: {profile}")
                    rounds.append(one)
                if len(rounds) > 1:
                    print_medians(rounds)
                results.append(rounds)
        if args.compare_rss:
            print_rss_comparison(args.sizes, results)
        else:
            print_summary(results)
    except BenchFailed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        print(f"logs in {workdir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    finally:
        if fake is not None:
            fake.close()
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
