"""Stopping on SIGINT / SIGTERM without taking a lock in the signal handler."""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import time
from collections.abc import Iterator
from types import FrameType


class StopRequest:
    """Set by SIGINT / SIGTERM; what a main loop waits on (stack, server, scheduler).

    A signal handler runs between two bytecodes of the main thread, even inside
    another run of itself: one that took a lock (`threading.Event.set`) could wait
    for ever on the lock its interrupted self held, as a second SIGTERM from make
    caused. So the handler only stores a number, and the wait is a `select` on a
    socket that `signal.set_wakeup_fd` writes to when any signal arrives.
    """

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._wakeup_reader, self._wakeup_writer = socket.socketpair()
        for end in (self._wakeup_reader, self._wakeup_writer):
            end.setblocking(False)

    def is_set(self) -> bool:
        return self.signal_number is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Return once a stop is requested (True) or `timeout` seconds have passed
        (False); no timeout waits for the stop."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            select.select([self._wakeup_reader], [], [], remaining)
            with contextlib.suppress(BlockingIOError):
                self._wakeup_reader.recv(4096)  # any signal's byte: only the flag counts
        return True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signal_number = signum

    @contextlib.contextmanager
    def installed(self, signals: tuple[signal.Signals, ...]) -> Iterator[StopRequest]:
        """Handle `signals` until the block ends, then put back what was there, or,
        once a stop was asked for, ignore them: the stop is done, and one more
        SIGTERM (make forwards each) must not kill the process on its way out,
        with a status saying it was killed."""
        previous_fd = signal.set_wakeup_fd(self._wakeup_writer.fileno(), warn_on_full_buffer=False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in signals}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_IGN if self.is_set() else handler)
            signal.set_wakeup_fd(previous_fd)
            self._wakeup_reader.close()
            self._wakeup_writer.close()
