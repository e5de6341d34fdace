"""What the code running now is about: the request, source, run, mailbox and provider.

Kept in contextvars, set by the RPC interceptor and by the engine, and read by the
JSON log formatter and by metrics that are labelled by provider. A thread starts
with an empty context, so code that hands work to threads of its own (the
engine's read-ahead, a provider's concurrent fetches) runs it in a copy of the
caller's (`contextvars.copy_context().run`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

FIELDS = ("request_id", "source_id", "run_id", "mailbox", "provider")

_VARS: dict[str, ContextVar[str | None]] = {
    name: ContextVar(f"ingestion_{name}", default=None) for name in FIELDS
}


@contextlib.contextmanager
def bound(
    *,
    request_id: str | None = None,
    source_id: str | None = None,
    run_id: str | None = None,
    mailbox: str | None = None,
    provider: str | None = None,
) -> Iterator[None]:
    """Set the given fields (those not None or empty) while inside."""
    given = {
        "request_id": request_id,
        "source_id": source_id,
        "run_id": run_id,
        "mailbox": mailbox,
        "provider": provider,
    }
    tokens = [(_VARS[name], _VARS[name].set(value)) for name, value in given.items() if value]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def current() -> dict[str, str]:
    """The fields set here, by name."""
    found = {name: var.get() for name, var in _VARS.items()}
    return {name: value for name, value in found.items() if value}


def provider() -> str | None:
    return _VARS["provider"].get()
