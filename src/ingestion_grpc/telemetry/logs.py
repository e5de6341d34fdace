"""Log output: human-readable lines by default, one JSON object a line with
`LOG_FORMAT=json`.

A JSON line holds only named fields: `time` (UTC, RFC 3339 with milliseconds),
`level`, `logger`, `message`, `pid`, then whichever of `request_id`, `source_id`,
`run_id`, `mailbox` and `provider` apply (`context.py`), and `exception` with the
traceback. The `extra` attributes of a record are never copied in: a line says no
more than its message, and messages never carry a credential (the providers'
tests search every logger for them).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from ingestion_grpc.telemetry import context

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")


class ContextFilter(logging.Filter):
    """Copies the context fields onto the record when it is emitted, in the thread
    that logged it (a handler writing elsewhere later still has them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.ingestion_context = context.current()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        fields = getattr(record, "ingestion_context", None)
        entry.update(fields if isinstance(fields, dict) else context.current())
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # ASCII escapes: a line stays one valid line whatever the stream's encoding.
        return json.dumps(entry, default=str)


def configure(level: str, log_format: str) -> None:
    """Set up the root logger of a server, worker or scheduler process.

    A Dramatiq worker process arrives with a handler of Dramatiq's own (writing
    to the pipe its parent reads): it is kept, with its format unless JSON is
    asked for, so output still goes where Dramatiq serialises it.
    """
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=TEXT_FORMAT)
    root.setLevel(level)
    if log_format != "json":
        return
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter())
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
