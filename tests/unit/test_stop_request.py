"""StopRequest: SIGTERM / SIGINT end a wait at once, through a handler that takes
no lock; what was installed before comes back unless a stop was asked for."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest

from ingestion_grpc.stop_request import StopRequest


@pytest.fixture(autouse=True)
def restore_signals() -> Iterator[None]:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


def test_a_wait_times_out_without_a_signal_and_handlers_come_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest().installed((signal.SIGTERM,)) as stop:
        assert stop.wait(0.05) is False
        assert not stop.is_set()
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_ends_the_wait_and_later_ones_are_ignored() -> None:
    with StopRequest().installed((signal.SIGTERM,)) as stop:
        # From another thread while the main one waits: the wakeup fd ends the select.
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
        assert stop.wait(30) is True
        assert stop.signal_number == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # a second one, as make forwards
        assert stop.wait() is True
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    os.kill(os.getpid(), signal.SIGTERM)  # on the way out: no effect


def test_another_signal_does_not_end_a_wait_without_timeout() -> None:
    signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    with StopRequest().installed((signal.SIGTERM,)) as stop:
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        assert stop.wait() is True
        assert stop.signal_number == signal.SIGTERM
