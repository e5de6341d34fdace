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


def worker_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` for a worker process, with our default idle poll unless it sets one."""
    return {"dramatiq_worker_timeout": str(IDLE_POLL_MS), **environ}
