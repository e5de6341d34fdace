"""ReadAhead: a provider's batches read in a thread, one ahead, in order."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from ingestion_grpc.engine.read_ahead import ReadAhead


class Source:
    """An iterator that records how far it was read, from which thread, and its close."""

    def __init__(self, items: int, fail_at: int | None = None) -> None:
        self.items = items
        self.fail_at = fail_at
        self.read: list[int] = []
        self.threads: set[str] = set()
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[int]:
        return self.generate()

    def generate(self) -> Iterator[int]:
        try:
            for item in range(self.items):
                self.threads.add(threading.current_thread().name)
                if item == self.fail_at:
                    raise ConnectionError(f"dropped at {item}")
                self.read.append(item)
                yield item
        finally:
            self.closed.set()


def test_every_item_in_order_read_in_its_own_thread() -> None:
    source = Source(20)
    with ReadAhead(iter(source), name="reader") as items:
        assert list(items) == list(range(20))
    assert source.threads == {"reader"}
    assert source.closed.is_set()


def test_reads_at_most_one_item_ahead() -> None:
    source = Source(10)
    with ReadAhead(iter(source), name="reader") as items:
        first = next(items)
        # Give the reader every chance to run ahead.
        for _ in range(50):
            threading.Event().wait(0.002)
        assert first == 0
        assert len(source.read) <= 2  # the one taken and the one ready


def test_an_error_of_the_source_is_raised_where_the_item_is_asked_for() -> None:
    source = Source(10, fail_at=3)
    with (
        pytest.raises(ConnectionError, match="dropped at 3"),
        ReadAhead(iter(source), name="reader") as items,
    ):
        assert [next(items) for _ in range(3)] == [0, 1, 2]
        next(items)
    assert source.closed.is_set()


def test_leaving_early_stops_the_reader_and_closes_the_source() -> None:
    source = Source(1_000)
    with ReadAhead(iter(source), name="reader") as items:
        assert next(items) == 0
    assert source.closed.is_set()
    assert len(source.read) <= 3
    assert not any(t.name == "reader" for t in threading.enumerate())
