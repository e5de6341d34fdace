"""Microsoft 365 import benchmark: a tenant of U users x M messages through the whole
stack, against a local HTTPS fake of the identity platform and Graph that enforces
Graph's per-mailbox limits.

What runs (all on this machine):

- the fake (tests/support/fake_graph.py) in a process of its own, so that serving
  the requests does not take the client's CPU. Every mailbox request takes
  `--latency` seconds (default 0.05) while it counts as in flight; a mailbox's 5th
  request at once is answered 429 MailboxConcurrency, and one past the request budget
  (`--budget` in `--window` seconds, default Graph's 10,000 per 10 minutes) 429
  ApplicationThrottled, both with Retry-After. TLS with a test CA the stack trusts
  through REQUESTS_CA_BUNDLE. Each user's mailbox holds M messages of the
  SpamAssassin ham corpus (each copy made unique by a header) over 12 folders,
  nested and non-ASCII among them;
- a PostgreSQL database and a Redis namespace of this run's own, the gRPC server in
  this process, Envoy in front of it (bench_imap's `running_stack`);
- P Dramatiq worker processes (1, 2 and 4 by default), each `--threads T` (default:
  enough for every user at once), sharing the provider's limits in Redis (16
  requests/s after a burst of 50, and 4 in flight, per mailbox), one DATA_DIR a round.

Timed: `POST /v1/ingestion-sources` (microsoft_365, maxConcurrentMailboxes = U)
until `GET` says `active`. The run fails unless the sync session says exactly U x M
fetched and archived, `archived_emails` holds them, and the fake served exactly one
successful `$value` per message.

The ceiling is what Graph's limits allow, counting one request per message (the
least any client needs; folder and delta listings count against us): the mailboxes
read at once, min(U, P x T), times the lower of 4 / latency (4 in flight) and
budget / window (the request budget as a rate). Targets: at least 0.85 of it, fewer
than 1 % of our requests answered 429, never more than 4 in flight for a mailbox.

    .venv/bin/python bench/bench_m365.py                          # 16 x 1,000; 1, 2, 4 workers
    .venv/bin/python bench/bench_m365.py --latency 0.5            # 4 in flight is the limit
    .venv/bin/python bench/bench_m365.py --users 4 --compare-rss 1000,10000
    .venv/bin/python bench/bench_m365.py --processes 1 --repeat 1 --py-spy prof.txt

`make bench-m365 USERS=16 PER_USER=1000 ARGS='--repeat 3'` does the same. Results:
docs/benchmarks-m365.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from ingestion_grpc.providers.graph_client import MAILBOX_CONCURRENCY, MAILBOX_REQUESTS
from tests.support.fake_graph import FakeGraph

PROVIDER = "microsoft_365"
# Graph's published per-mailbox limits.
GRAPH_BUDGET = 10_000
GRAPH_WINDOW = 600.0
IN_FLIGHT = MAILBOX_CONCURRENCY.limit
TARGET_RATIO = 0.85
TARGET_THROTTLED = 0.01
TICKS = os.sysconf("SC_CLK_TCK")
# A user's mail, by share of its messages: nested, hidden-free, localised folders
# under the standard ones (Inbox, Archive, ... exist in every mailbox).
LAYOUT = (
    ("Inbox", 0.40),
    ("Inbox/Projekte", 0.10),
    ("Inbox/Projekte/2024", 0.10),
    ("Archive/2023", 0.10),
    ("Sent Items", 0.10),
    ("Deleted Items", 0.10),
    ("Junk Email", 0.05),
    ("Boîte de réception/アーカイブ", 0.05),
)


# -- the fake, in a process of its own ------------------------------------------------


@dataclass(frozen=True)
class Tenant:
    url: str
    ca_path: str
    tenant_id: str
    client_id: str
    client_secret: str


@dataclass(frozen=True)
class Counters:
    """What the fake saw of one round's users, and its process's CPU time."""

    requests: int  # mailbox requests, answered or refused
    throttled: int  # of them answered 429
    peak_in_flight: int  # the most at once for any one mailbox, refused ones included
    downloads: int  # $value answered 200
    other_requests: int  # token and /users requests (not a mailbox's)
    cpu_seconds: float  # the fake process's CPU time (run_round keeps the round's)


def _layout(per_user: int) -> list[tuple[str, int]]:
    """How many of a user's messages go to each folder (every message somewhere)."""
    counts = [(path, int(per_user * share)) for path, share in LAYOUT]
    rest = per_user - sum(n for _, n in counts)
    return [(counts[0][0], counts[0][1] + rest), *counts[1:]]


def _seed(fake: FakeGraph, users: int, per_user: int, tag: str) -> list[str]:
    upns = [f"user{n:03d}@{tag}.bench.example" for n in range(users)]
    for n, upn in enumerate(upns):
        user = fake.add_user(upn)
        messages = bench_messages(per_user, f"{tag}-{n}")
        for path, count in _layout(per_user):
            parts = path.split("/")
            for depth in range(1, len(parts) + 1):  # parents first
                if "/".join(parts[:depth]) not in {f.path for f in user.folders.values()}:
                    fake.add_folder(user, parts[depth - 1], "/".join(parts[: depth - 1]) or None)
            fake.add_messages(user, user.folder(path), (next(messages) for _ in range(count)))
    return upns


def _counters(fake: FakeGraph, upns: list[str]) -> tuple[Any, ...]:
    users = [fake.user(upn) for upn in upns]
    stats = [fake.stats(user) for user in users]
    downloads = sum(
        1 for user in users for r in fake.requests_to(user, "/$value") if r.status == 200
    )
    return (
        sum(s.requests for s in stats),
        sum(s.throttled for s in stats),
        max((s.peak_concurrency for s in stats), default=0),
        downloads,
        sum(1 for r in list(fake.requests) if r.user_id is None),
        _cpu(),
    )


def _serve_fake(
    conn: multiprocessing.connection.Connection, latency: float, budget: int, window: float
) -> None:
    """The fake's process: serve, and answer the parent's commands on `conn`.

    Replies are plain tuples: this module runs as `__mp_main__` here, so its classes
    would not unpickle in the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    fake = FakeGraph(latency=latency)
    fake.budget, fake.budget_window = budget, window
    fake.start()
    conn.send((fake.url, str(fake.ca_path), fake.tenant_id, fake.client_id, fake.client_secret))
    rounds: dict[str, list[str]] = {}
    while True:
        command, *args = conn.recv()
        if command == "seed":
            users, per_user, tag = args
            rounds[tag] = _seed(fake, users, per_user, tag)
            conn.send(None)
        elif command == "counters":
            conn.send(_counters(fake, rounds[args[0]]))
        elif command == "set":
            setattr(fake, args[0], args[1])
            conn.send(None)
        elif command == "forget":
            for upn in rounds.pop(args[0]):
                fake.remove_user(fake.user(upn))
            fake.reset_counters()  # and the request log
            conn.send(None)
        else:
            break
    fake.stop()


def _cpu(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class FakeProcess:
    """FakeGraph serving from a child process, driven over a pipe."""

    def __init__(self, latency: float, budget: int, window: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(
            target=_serve_fake,
            args=(child, latency, budget, window),
            name="fake-graph",
            daemon=True,
        )
        self.process.start()
        if not self._conn.poll(60):
            raise BenchFailed("the fake of Graph did not start in 60 s")
        self.tenant = Tenant(*self._conn.recv())

    def _ask(self, *command: Any) -> Any:
        try:
            self._conn.send(command)
            if not self._conn.poll(600):
                raise BenchFailed(f"the fake of Graph did not answer {command[0]!r}")
            return self._conn.recv()
        except (EOFError, OSError):
            raise BenchFailed(f"the fake of Graph died on {command[0]!r} (see above)") from None

    def seed(self, users: int, per_user: int, tag: str) -> None:
        self._ask("seed", users, per_user, tag)

    def counters(self, tag: str) -> Counters:
        return Counters(*self._ask("counters", tag))

    def set(self, name: str, value: Any) -> None:
        self._ask("set", name, value)

    def forget(self, tag: str) -> None:
        self._ask("forget", tag)

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
    per_mailbox_ceiling: float
    counters: Counters

    @property
    def ceiling(self) -> float:
        return self.parallel * self.per_mailbox_ceiling

    @property
    def ratio(self) -> float:
        return self.result.rate / self.ceiling

    @property
    def throttled_share(self) -> float:
        c = self.counters
        return c.throttled / c.requests if c.requests else 0.0


def per_mailbox_ceiling(latency: float, budget: float | None, window: float) -> float:
    """Requests a second Graph's limits let one mailbox have: 4 in flight at the
    fake's latency, or the request budget as a rate, whichever is lower."""
    in_flight = IN_FLIGHT / latency if latency > 0 else math.inf
    budgeted = budget / window if budget else math.inf
    return min(in_flight, budgeted)


def run_round(
    stack: Stack,
    fake: FakeProcess,
    *,
    users: int,
    per_user: int,
    processes: int,
    threads: int,
    tag: str,
    ceiling: float,
    extra: dict[str, str],
    prefetch: int | None,
    profile: Path | None,
) -> Round:
    """Seed a new tenant, import it with `processes` fresh workers, check the fake's side."""
    started = time.monotonic()
    fake.seed(users, per_user, tag)
    expected = users * per_user
    print(f"  seeded {users} users x {per_user:,} messages in {time.monotonic() - started:.1f} s")
    # One blob store per round, shared by the round's workers: a fresh archive.
    environment = {**stack.environment, **extra, "DATA_DIR": str(stack.workdir / f"data-{tag}")}
    if prefetch is not None:
        environment["dramatiq_queue_prefetch"] = str(prefetch or threads)
    workers = [
        Worker(environment, stack.workdir / f"worker-{tag}-{n}.log", threads=threads)
        for n in range(processes)
    ]
    tenant = fake.tenant
    config = {
        "tenantId": tenant.tenant_id,
        "clientId": tenant.client_id,
        "clientSecret": tenant.client_secret,
        "includeUsers": [f"*@{tag}.bench.example"],
        # The engine's default (8) would cap the users read at once below the workers'.
        "maxConcurrentMailboxes": users,
    }
    parallel = min(users, processes * threads)
    try:
        cpu_before = fake.counters(tag).cpu_seconds
        result = timed_import(
            stack,
            workers,
            {"name": f"m365 {tag}", "provider": PROVIDER, "providerConfig": config},
            expected,
            settled="active",
            timeout=max(600.0, 5 * expected / (ceiling * parallel)),
            profile=profile,
        )
        counters = fake.counters(tag)
        counters = dataclasses.replace(counters, cpu_seconds=counters.cpu_seconds - cpu_before)
    finally:
        fake.forget(tag)
    if counters.downloads != expected:
        raise BenchFailed(f"the fake served {counters.downloads:,} messages, expected {expected:,}")
    return Round(result, processes, threads, parallel, ceiling, counters)


# -- reporting ----------------------------------------------------------------------------


def print_round(one: Round) -> None:
    result, c = one.result, one.counters
    print(
        f"  {result.messages:,} messages ({result.size_bytes / MB:.1f} MB) in "
        f"{result.seconds:.1f} s: {result.rate:,.0f} messages/s; ceiling {one.parallel} "
        f"mailboxes x {one.per_mailbox_ceiling:.2f} = {one.ceiling:,.0f} messages/s; "
        f"ours / ceiling {one.ratio:.2f}"
    )
    print(
        f"  requests: {c.requests:,} to mailboxes ({c.requests / result.messages:.3f} a "
        f"message), {c.other_requests} others; 429s we caused: {c.throttled:,} "
        f"({100 * one.throttled_share:.2f} %); most in flight for one mailbox: "
        f"{c.peak_in_flight}"
    )
    print(
        f"  worker peak RSS {result.worker_peak_kib / 1024:.1f} MiB (VmHWM, highest of "
        f"{one.processes} worker processes; sampled max {result.worker_sampled_kib / 1024:.1f} "
        f"MiB); the fake used {100 * c.cpu_seconds / result.seconds:.0f} % of a CPU"
    )


def print_medians(rounds: list[Round]) -> None:
    first = rounds[0]
    rate = statistics.median(r.result.rate for r in rounds)
    ratio = statistics.median(r.ratio for r in rounds)
    share = statistics.median(r.throttled_share for r in rounds)
    rss = statistics.median(r.result.worker_peak_kib for r in rounds) / 1024
    ratios = ", ".join(f"{r.ratio:.2f}" for r in rounds)
    peak = max(r.counters.peak_in_flight for r in rounds)
    print(
        f"  median of {len(rounds)}: {rate:,.0f} messages/s, ceiling {first.ceiling:,.0f}, "
        f"ours / ceiling {ratio:.2f} ({ratios}); 429s {100 * share:.2f} % of requests; "
        f"most in flight {peak}; worker peak RSS {rss:.1f} MiB"
    )


def print_summary(configurations: list[list[Round]]) -> None:
    print("summary (medians):")
    print(
        "  workers x threads | messages/s | ceiling | ours/ceiling | 429s    | in flight | peak RSS"
    )
    for rounds in configurations:
        first = rounds[0]
        ratio = statistics.median(r.ratio for r in rounds)
        share = statistics.median(r.throttled_share for r in rounds)
        peak = max(r.counters.peak_in_flight for r in rounds)
        print(
            f"  {first.processes:>7} x {first.threads:<7} | "
            f"{statistics.median(r.result.rate for r in rounds):>10,.0f} | "
            f"{first.ceiling:>7,.0f} | {ratio:>12.2f} | {100 * share:>5.2f} % | "
            f"{peak:>9} | "
            f"{statistics.median(r.result.worker_peak_kib for r in rounds) / 1024:>6.1f} MiB"
        )
    ratios = [statistics.median(r.ratio for r in rounds) for rounds in configurations]
    shares = [statistics.median(r.throttled_share for r in rounds) for rounds in configurations]
    peak = max(r.counters.peak_in_flight for rounds in configurations for r in rounds)
    print(
        f"  targets: ours / ceiling >= {TARGET_RATIO}: "
        f"{'met' if min(ratios) >= TARGET_RATIO else 'MISSED'} (lowest {min(ratios):.2f}); "
        f"429s < {100 * TARGET_THROTTLED:g} %: "
        f"{'met' if max(shares) < TARGET_THROTTLED else 'MISSED'} "
        f"(highest {100 * max(shares):.2f} %); at most {IN_FLIGHT} in flight: "
        f"{'met' if peak <= IN_FLIGHT else 'MISSED'} (most {peak})"
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
    parser.add_argument("--users", type=int, default=16, help="users in the tenant (16)")
    parser.add_argument("--per-user", type=int, default=1000, help="messages a user (1000)")
    parser.add_argument(
        "--processes",
        default="1,2,4",
        help="worker process counts to measure, comma-separated (1,2,4)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="threads a worker process (default: enough for every user at once)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds per configuration (3)")
    parser.add_argument(
        "--latency",
        type=float,
        default=0.05,
        help="seconds every mailbox request takes at the fake (0.05)",
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=GRAPH_BUDGET,
        help=f"requests a mailbox may make per --window ({GRAPH_BUDGET:,}, Graph's)",
    )
    parser.add_argument(
        "--window",
        type=float,
        default=GRAPH_WINDOW,
        help=f"seconds of the request budget ({GRAPH_WINDOW:g}, Graph's)",
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        help="dramatiq_queue_prefetch of the workers, 0 for their thread count "
        "(default: what the workers set, one job a thread)",
    )
    parser.add_argument(
        "--compare-rss",
        nargs="?",
        const="1000,10000",
        metavar="SIZES",
        help="import tenants of these messages a user (default 1000,10000), with the "
        "first --processes count and the request budget lifted (at Graph's, 10,000 "
        "messages take a mailbox over 10 minutes), and compare the worker's peak RSS",
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
    if args.latency < 0 or args.budget < 1 or args.window <= 0:
        parser.error("--latency must be >= 0, --budget >= 1 and --window > 0")
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
    workdir = Path(tempfile.mkdtemp(prefix="bench-m365-", dir=args.workdir))
    workdir.chmod(0o755)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    budget: int | None = None if args.compare_rss else args.budget
    extra: dict[str, str] = {}
    if args.compare_rss:
        # Memory, not pace, is measured: the workers' bucket and the fake's budget off.
        extra["LIMIT_" + MAILBOX_REQUESTS.name.upper()] = "100000"
    ceiling = per_mailbox_ceiling(args.latency, budget, args.window)
    limits = (
        "request budget lifted"
        if budget is None
        else f"{args.budget:,} requests per {args.window:g} s"
    )
    print(
        f"Microsoft 365 import benchmark: {args.users} users x "
        f"{', '.join(f'{s:,}' for s in args.sizes)} messages; fake latency "
        f"{args.latency * 1000:g} ms, {IN_FLIGHT} in flight and {limits} per mailbox "
        f"(ceiling {ceiling:.2f} requests/s a mailbox); {os.cpu_count()} CPUs, load "
        f"average {load}"
    )
    print(f"  workdir {workdir}")
    results: list[list[Round]] = []
    fake: FakeProcess | None = None
    try:
        fake = FakeProcess(args.latency, args.budget, args.window)
        if budget is None:
            fake.set("budget", None)
        # The server checks connections in this process; workers inherit it too.
        os.environ["REQUESTS_CA_BUNDLE"] = fake.tenant.ca_path
        environment = {
            "MICROSOFT_AUTHORITY_HOST": fake.tenant.url,
            "MICROSOFT_GRAPH_ENDPOINT": fake.tenant.url,
            "REQUESTS_CA_BUNDLE": fake.tenant.ca_path,
        }
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
                        ceiling=ceiling,
                        extra=extra,
                        prefetch=args.prefetch,
                        profile=profile,
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
