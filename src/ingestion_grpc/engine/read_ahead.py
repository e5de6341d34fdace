"""Reading the next batch from a provider while the current one is being stored.

A provider spends its time waiting on the network (IMAP) or the disk (files), the
engine on fsync and PostgreSQL: run one in a thread beside the other and both
waits overlap. At most one batch is read ahead, so memory stays at two batches.
"""

from __future__ import annotations

import contextlib
import contextvars
import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

# How often the consumer, while stopping, looks whether the reader has finished.
_STOP_POLL_SECONDS = 0.05


class _End:
    """Put by the reader when the source is exhausted."""


class _Failed:
    """Put by the reader when the source raised; carries the exception."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class ReadAhead(Generic[T]):
    """Iterate `source` in a thread of its own, one item ahead of the consumer.

    The thread owns `source`: it alone advances and closes it, so a generator
    holding a connection (IMAP) is used from one thread only. An exception raised
    by `source` is raised again, with its traceback, where the consumer asks for
    the item it was reading. Use as a context manager: leaving it (after an error,
    a pause, or the end) stops the reader once the item in progress is read, and
    closes `source`.
    """

    def __init__(self, source: Iterator[T], name: str) -> None:
        self._source = source
        # maxsize 1 plus the reader's wait for the hand-over (`join`): one item
        # queued or in the consumer's hands, one being read.
        self._items: queue.Queue[T | _End | _Failed] = queue.Queue(maxsize=1)
        self._stopping = threading.Event()
        # The reader runs in a copy of the caller's context: what the provider logs
        # there is about the same run and mailbox (telemetry.context).
        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._read,), name=name, daemon=True
        )

    def __enter__(self) -> Iterator[T]:
        self._thread.start()
        return self._consume()

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        while self._thread.is_alive():
            # Take what the reader hands over so that it is never stuck in put().
            with contextlib.suppress(queue.Empty):
                self._items.get(timeout=_STOP_POLL_SECONDS)
                self._items.task_done()
        self._thread.join()

    def _consume(self) -> Iterator[T]:
        while True:
            item = self._items.get()
            self._items.task_done()
            if isinstance(item, _End):
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def _read(self) -> None:
        try:
            for item in self._source:
                if self._stopping.is_set():
                    return
                self._hand_over(item)
                if self._stopping.is_set():
                    return
            self._hand_over(_End())
        except BaseException as error:  # re-raised in the consumer, where it belongs
            self._hand_over(_Failed(error))
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()

    def _hand_over(self, item: T | _End | _Failed) -> None:
        self._items.put(item)
        # Read the next item only once this one is taken: two in memory, not three.
        self._items.join()
