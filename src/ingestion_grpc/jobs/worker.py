"""How a Dramatiq worker process of this service is started."""

from __future__ import annotations

import sys


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
