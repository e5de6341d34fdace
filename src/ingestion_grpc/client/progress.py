"""Following a run until it ends: its counters, its mailboxes, and how it ended.

The run is read with ListSyncSessions every POLL_SECONDS; a run of several
mailboxes (a tenant) is also read mailbox by mailbox with ListSyncSessionMailboxes,
less often, since that is one page per thousand mailboxes. On a terminal the
progress is drawn with rich; otherwise a line is printed when a mailbox ends and,
at most every PLAIN_EVERY_SECONDS, when the counters moved.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ingestion.v1 import resources_pb2
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from ingestion_grpc.client.errors import EXIT_FAILED, EXIT_OK, CommandError
from ingestion_grpc.client.output import Output
from ingestion_grpc.client.service import Service

POLL_SECONDS = 0.5
MAILBOX_POLL_SECONDS = 2.0
PLAIN_EVERY_SECONDS = 5.0
# How long a new source may take to show its first run.
FIRST_RUN_TIMEOUT_SECONDS = 30.0
ENDED_MAILBOX = frozenset({"done", "failed", "skipped"})

Run = resources_pb2.SyncSession
MailboxRow = resources_pb2.SyncSessionMailbox


def counters(run: Run) -> str:
    return (
        f"{run.messages_fetched} fetched, {run.messages_archived} archived, "
        f"{run.messages_already_present} already present, {run.messages_skipped} skipped, "
        f"{run.messages_failed} failed"
    )


def mailboxes_line(run: Run) -> str:
    ended = run.mailboxes_done + run.mailboxes_failed + run.mailboxes_skipped
    return f"{ended}/{run.mailboxes_total} mailboxes"


def summary(run: Run) -> str:
    """The one line that says how a run ended (or where it stands)."""
    took = ""
    if run.HasField("finished_at"):
        seconds = (run.finished_at.ToDatetime() - run.started_at.ToDatetime()).total_seconds()
        took = f" in {seconds:.1f}s"
    done = (
        f"{run.messages_archived} archived, {run.messages_already_present} already present, "
        f"{run.messages_skipped} skipped, {run.messages_failed} failed; "
        f"{run.mailboxes_done} of {run.mailboxes_total} mailboxes done"
    )
    if run.status == "completed":
        return f"completed: {done}{took}"
    if run.status == "failed":
        return f"failed: {run.error_message or 'see the run'} ({done}{took})"
    if run.status == "paused":
        return f"paused: {done}"
    return f"{run.status}: {done}"


def wait_for_first_run(service: Service, source_id: str) -> Run:
    deadline = time.monotonic() + FIRST_RUN_TIMEOUT_SECONDS
    while (run := service.latest_run(source_id)) is None:
        if time.monotonic() > deadline:
            raise CommandError(f"source {source_id} has not started a run")
        time.sleep(POLL_SECONDS)
    return run


class _Plain:
    def __init__(self, output: Output) -> None:
        self._output = output
        self._printed_at = 0.0
        self._last = ""
        self._states: dict[str, str] = {}

    def show(self, run: Run, mailboxes: list[MailboxRow] | None) -> None:
        for row in mailboxes or ():
            if row.state in ENDED_MAILBOX and self._states.get(row.mailbox) != row.state:
                reason = f": {row.error_message}" if row.error_message else ""
                self._output.line(
                    f"mailbox {row.display_name}: {row.state}{reason} "
                    f"({row.messages_archived} archived, {row.messages_already_present} already "
                    f"present, {row.messages_failed} failed)"
                )
            self._states[row.mailbox] = row.state
        now = time.monotonic()
        line = f"progress: {mailboxes_line(run)}, {counters(run)}"
        # Nothing to say before the mailboxes are listed.
        moved = line != self._last and (run.mailboxes_total or run.messages_fetched)
        if run.status == "running" and moved and now - self._printed_at >= PLAIN_EVERY_SECONDS:
            self._output.line(line)
            self._printed_at, self._last = now, line

    def close(self) -> None:
        pass


class _Bars:
    def __init__(self, output: Output) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=output.console,
        )
        self._progress.start()
        self._mailboxes = self._progress.add_task("mailboxes", total=None, detail="")
        self._messages = self._progress.add_task("messages", total=None, detail="")
        self._running: dict[str, TaskID] = {}

    def show(self, run: Run, mailboxes: list[MailboxRow] | None) -> None:
        ended = run.mailboxes_done + run.mailboxes_failed + run.mailboxes_skipped
        self._progress.update(
            self._mailboxes,
            completed=ended,
            total=run.mailboxes_total or None,
            detail=f"{run.mailboxes_failed} failed, {run.mailboxes_skipped} skipped",
        )
        # The number of messages is known only once they are read: no total.
        self._progress.update(
            self._messages,
            completed=run.messages_fetched,
            detail=(
                f"{run.messages_archived} archived, {run.messages_already_present} present, "
                f"{run.messages_failed} failed"
            ),
        )
        if mailboxes is None:
            return
        running = {row.mailbox: row for row in mailboxes if row.state == "running"}
        for mailbox in set(self._running) - set(running):
            self._progress.remove_task(self._running.pop(mailbox))
        for mailbox, row in running.items():
            if mailbox not in self._running:
                self._running[mailbox] = self._progress.add_task(
                    f"  {row.display_name}", total=None, detail=""
                )
            self._progress.update(
                self._running[mailbox],
                completed=row.messages_fetched,
                detail=f"{row.messages_archived} archived",
            )

    def close(self) -> None:
        self._progress.stop()


def follow(
    service: Service,
    source_id: str,
    run_id: str,
    output: Output,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Show the run until it is no longer running; 0 if it completed, 1 otherwise."""
    run = service.run(source_id, run_id)
    output.line(f"run {run.id} ({run.kind}) of source {source_id}: {run.status}")
    display = _Bars(output) if output.is_terminal else _Plain(output)
    mailboxes_read_at = 0.0
    try:
        while True:
            mailboxes = None
            ended = run.status != "running"
            if run.mailboxes_total > 1 and (
                ended or time.monotonic() - mailboxes_read_at >= MAILBOX_POLL_SECONDS
            ):
                mailboxes = service.run_mailboxes(source_id, run.id)
                mailboxes_read_at = time.monotonic()
            display.show(run, mailboxes)
            if ended:
                break
            sleep(POLL_SECONDS)
            run = service.run(source_id, run_id)
    finally:
        display.close()
    output.line(summary(run))
    if run.status == "paused":
        output.line(f"resume it with: ingestion-grpc sources resume {source_id}")
    return EXIT_OK if run.status == "completed" else EXIT_FAILED
