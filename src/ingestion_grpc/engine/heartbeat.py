"""A mailbox job's heartbeat, beside its batches.

The watchdog takes a mailbox whose heartbeat is older than STALE_RUN_AFTER for
dead and sends it to another worker. A job reports with every committed batch,
but one batch can take longer than that (a slow provider, a slow object store, a
provider waiting out a Retry-After): the mailbox would be taken over while it
works, the first worker would lose its lease at its next batch, and two workers
could keep taking it from each other with no progress. So while a job holds its
claim, a thread of its own reports it alive every STALE_RUN_AFTER / 4, each time
in a short transaction of its own (never the batch's), and only while the lease
holds: once another worker holds the mailbox the beat stops, and the job stops
at its next batch instead of writing it.

A killed worker's heartbeat dies with it, so its mailbox is still taken over
after STALE_RUN_AFTER.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from datetime import timedelta
from types import TracebackType

from ingestion_grpc.db.session import Database
from ingestion_grpc.domain import lifecycle
from ingestion_grpc.domain.lifecycle import MailboxClaim
from ingestion_grpc.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

# Beats per STALE_RUN_AFTER: three may be late (a busy database, a stalled
# machine) before the mailbox looks dead.
BEATS_PER_STALE_PERIOD = 4
# A batch still unfinished after this long hangs in a call that no timeout
# interrupts: the heartbeat then stops, so that the watchdog hands the mailbox to
# another worker as it would a dead worker's. The mailbox actors' time limit
# (jobs/actors.py) is as long.
HUNG_BATCH_SECONDS = 3600.0


class MailboxHeartbeat:
    """Reports `claim` alive while the job runs (use as a context manager).

    The job calls `batch_committed()` after each batch, asks `lost` before
    storing the next one, and `stop()`s it once it handed the mailbox back.
    """

    def __init__(
        self,
        database: Database,
        claim: MailboxClaim,
        stale_after: timedelta,
        *,
        hung_after: float = HUNG_BATCH_SECONDS,
    ) -> None:
        self._database = database
        self._claim = claim
        self._interval = stale_after.total_seconds() / BEATS_PER_STALE_PERIOD
        self._hung_after = hung_after
        self._batch_started = time.monotonic()
        self._stopping = threading.Event()
        self._lost = threading.Event()
        # In a copy of the job's context: its log lines name the run and mailbox.
        self._thread = threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._beat,),
            name=f"heartbeat {claim.mailbox}",
            daemon=True,
        )

    @property
    def lost(self) -> bool:
        """Whether another worker holds the mailbox now (the watchdog gave it away)."""
        return self._lost.is_set()

    def batch_committed(self) -> None:
        self._batch_started = time.monotonic()

    def stop(self) -> None:
        """No more beats: the job has handed the mailbox back (it may still be
        waiting for a batch being read ahead)."""
        self._stopping.set()

    def __enter__(self) -> MailboxHeartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stopping.wait(self._interval):
            if time.monotonic() - self._batch_started > self._hung_after:
                log.error(
                    "mailbox %s of run %s: a batch has run for over %.0f s; "
                    "no longer reported alive, so that another worker takes it over",
                    self._claim.mailbox,
                    self._claim.run_id,
                    self._hung_after,
                )
                return
            try:
                with self._database.unit_of_work() as uow:
                    held = lifecycle.report_alive(uow, self._claim)
                    uow.commit()
            except DatabaseUnavailable:
                continue  # the batch meets the outage too, and hands the mailbox back
            except Exception:
                log.exception("mailbox %s: heartbeat failed; trying again", self._claim.mailbox)
                continue
            if not held:
                log.warning(
                    "lost the lease on mailbox %s of run %s",
                    self._claim.mailbox,
                    self._claim.run_id,
                )
                self._lost.set()
                return
