"""What a source's lastSyncStatusMessage says when a mailbox fails unexpectedly."""

from __future__ import annotations

import errno

import pytest

from ingestion_grpc.engine.mailboxes import _describe
from ingestion_grpc.errors import ProviderUnavailable


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (
            ProviderUnavailable("IMAP server unavailable: refused"),
            "IMAP server unavailable: refused",
        ),
        (
            OSError(errno.ENOSPC, "No space left on device", "/data/blobs/ab/.x.tmp"),
            "the archive's storage is full",
        ),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "the archive's storage is full"),
        (OSError(errno.EIO, "Input/output error", "/secret/path"), "OSError"),
        (KeyError("password=hunter2"), "KeyError"),
    ],
)
def test_failure_messages(error: Exception, message: str) -> None:
    assert _describe(error) == message
