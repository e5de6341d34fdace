"""The shared real-mail corpora (../shared/corpora beside the repository)."""

from __future__ import annotations

import mailbox
from functools import cache
from pathlib import Path

CORPORA = Path(__file__).resolve().parents[2].parent / "shared" / "corpora"
HAM = CORPORA / "spamassassin-easy-ham-1.mbox"
SPAM = CORPORA / "spamassassin-spam-1.mbox"
ENRON_PST = CORPORA / "enron.pst"


@cache
def mbox_messages(path: Path) -> tuple[bytes, ...]:
    """Every message of an mbox as `mailbox.mbox(...).get_bytes` returns it."""
    box = mailbox.mbox(path, create=False)
    try:
        return tuple(box.get_bytes(key) for key in box.iterkeys())
    finally:
        box.close()


def numbered(messages: tuple[bytes, ...], copies: int) -> list[bytes]:
    """`copies` distinct copies of each message: a header in front makes each unique."""
    return [b"X-Test-Copy: %d\r\n" % copy + raw for copy in range(copies) for raw in messages]
