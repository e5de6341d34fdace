"""Source statuses and the transitions between them.

    create:  pending_auth -> auth_success -> importing (initial import queued)
    import:  any idle status -> importing
    sync:    any idle status -> syncing
    pause:   any status -> paused (a running job stops at its next checkpoint)
    resume:  paused -> active
    a run ends: importing/syncing -> active, imported (files) or error

A run may start only from an idle status; the claim is one conditional UPDATE
in PostgreSQL, so two concurrent requests cannot both start a run.
"""

from __future__ import annotations

from enum import StrEnum


class SourceStatus(StrEnum):
    PENDING_AUTH = "pending_auth"
    AUTH_SUCCESS = "auth_success"
    IMPORTING = "importing"
    SYNCING = "syncing"
    ACTIVE = "active"
    PAUSED = "paused"
    ERROR = "error"
    IMPORTED = "imported"


class RunKind(StrEnum):
    IMPORT = "import"
    SYNC = "sync"


RUNNING = frozenset({SourceStatus.IMPORTING, SourceStatus.SYNCING})
# Statuses from which a run may be claimed.
IDLE = frozenset(
    {SourceStatus.AUTH_SUCCESS, SourceStatus.ACTIVE, SourceStatus.ERROR, SourceStatus.IMPORTED}
)
# The statuses a client may set through Update; the rest are the engine's.
CLIENT_SETTABLE = frozenset({SourceStatus.ACTIVE, SourceStatus.PAUSED})

RUN_STATUS = {RunKind.IMPORT: SourceStatus.IMPORTING, RunKind.SYNC: SourceStatus.SYNCING}
