"""LOG_FORMAT=json lines: the named fields, the context they apply to, nothing else."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from ingestion_grpc.telemetry import context
from ingestion_grpc.telemetry.logs import ContextFilter, JsonFormatter


@pytest.fixture
def lines() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("test.json")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def entries(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_is_one_object_with_the_named_fields(
    lines: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = lines
    logger.info("two\nlines, %s", "ünïcode")
    [entry] = entries(stream)
    assert set(entry) == {"time", "level", "logger", "message", "pid"}
    assert entry["message"] == "two\nlines, ünïcode"
    assert (entry["level"], entry["logger"]) == ("INFO", "test.json")
    assert str(entry["time"]).endswith("Z") and "T" in str(entry["time"])
    assert len(stream.getvalue().splitlines()) == 1


def test_the_context_applies_while_bound_only(lines: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = lines
    with context.bound(request_id="req-1", source_id="src-1"):
        with context.bound(run_id="run-1", mailbox="alice@example.com", provider=None):
            logger.warning("inner")
        logger.warning("outer")
    logger.warning("none")
    inner, outer, none = entries(stream)
    assert (inner["request_id"], inner["source_id"], inner["run_id"]) == ("req-1", "src-1", "run-1")
    assert inner["mailbox"] == "alice@example.com" and "provider" not in inner
    assert "run_id" not in outer and outer["source_id"] == "src-1"
    assert not {"request_id", "source_id", "run_id", "mailbox"} & set(none)


def test_extra_attributes_are_never_copied(lines: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = lines
    logger.info("login", extra={"password": "hunter2", "source_id": "spoofed"})
    assert "hunter2" not in stream.getvalue()
    assert "source_id" not in entries(stream)[0]


def test_an_exception_is_one_field(lines: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = lines
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    [entry] = entries(stream)
    assert entry["level"] == "ERROR"
    assert "ValueError: boom" in str(entry["exception"])
