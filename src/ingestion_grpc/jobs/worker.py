"""How a Dramatiq worker process of this service is started."""

from __future__ import annotations

import sys
from collections.abc import Mapping

# Milliseconds an idle worker waits before it asks Redis again (Dramatiq's
# default, 1,000, delays the first job after a quiet spell by up to a second:
# a forced sync or a new source would sit in the queue for nothing). Ten small
# Redis calls a second per queue are cheap; set dramatiq_worker_timeout to
# change it.
IDLE_POLL_MS = 100


def worker_command(threads: int, processes: int = 1) -> list[str]:
    """The command line of a worker: Dramatiq's CLI loading our actors."""
    return [
        sys.executable,
        "-m",
        "dramatiq",
        "ingestion_grpc.jobs.actors",
        "--processes",
        str(processes),
        "--threads",
        str(threads),
    ]


def worker_environment(environ: Mapping[str, str], threads: int) -> dict[str, str]:
    """`environ` for a worker process of `threads` threads, with our defaults for
    what it does not set.

    Prefetch: Dramatiq's default lets a process hold twice as many jobs as it has
    threads, so with a tenant's mailbox jobs sent at once the first processes to
    poll took them all while the others idled (bench-google: 0.47 of Gmail's
    ceiling with 4 processes, 0.87 with one job a thread).
    """
    return {
        "dramatiq_worker_timeout": str(IDLE_POLL_MS),
        "dramatiq_queue_prefetch": str(threads),
        **environ,
    }
