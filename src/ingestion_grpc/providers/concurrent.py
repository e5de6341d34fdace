"""Fetching many messages of one mailbox at once, handed over in their listed order.

Cloud APIs answer one message per request, so a mailbox is read quickly only with
several requests in flight (Gmail: about 5; Graph: at most 4). The engine wants
batches in a deterministic order with a cursor that is true after them: results
are therefore yielded in the order of the input, whatever order they finish in.

Memory stays bounded: at most `max_in_flight` requests run, and no new one starts
while the results waiting to be handed over hold `max_bytes_waiting` or more.
"""

from __future__ import annotations

import contextvars
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def fetch_in_order(
    fetch: Callable[[T], R],
    items: Iterable[T],
    *,
    max_in_flight: int,
    size_of: Callable[[R], int],
    max_bytes_waiting: int,
    name: str = "fetch",
) -> Iterator[tuple[T, R]]:
    """`(item, fetch(item))` for every item, in the order of `items`.

    An exception raised by `fetch` is raised here, when its item's turn comes
    (the results before it have been yielded). Closing the iterator early waits
    for the requests in flight and drops their results.
    """
    pending: deque[tuple[T, Future[R]]] = deque()
    source = iter(items)
    exhausted = False
    waiting_bytes = 0
    with ThreadPoolExecutor(max_in_flight, thread_name_prefix=name) as pool:
        try:
            while True:
                while not exhausted and len(pending) < max_in_flight:
                    if waiting_bytes >= max_bytes_waiting and pending:
                        break
                    try:
                        item = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    # In a copy of this thread's context: the request's log lines
                    # and metrics name the caller's mailbox and provider.
                    in_context = contextvars.copy_context().run
                    pending.append((item, pool.submit(in_context, fetch, item)))
                if not pending:
                    return
                item, future = pending.popleft()
                result = future.result()
                waiting_bytes = sum(
                    size_of(f.result()) for _, f in pending if f.done() and f.exception() is None
                )
                yield item, result
        finally:
            for _, future in pending:
                future.cancel()
