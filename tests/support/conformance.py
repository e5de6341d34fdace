"""What a provider conformance case is (tests/integration/test_provider_conformance.py):
how to create a source of the provider, and what the archive must then hold."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def sha(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


@dataclass
class Expected:
    """What the archive must hold: {mailbox display name: {sha256: folder paths}}."""

    mailboxes: dict[str, dict[str, set[str]]]
    raw: dict[str, bytes]
    skipped: dict[str, str] = field(default_factory=dict)  # display name: reason part
    messages_skipped: int = 0
    messages_failed: int = 0

    @property
    def total(self) -> int:
        return sum(len(m) for m in self.mailboxes.values())


@dataclass
class Case:
    provider: str
    # (big) -> providerConfig; a big source has enough mail to be caught mid-import.
    config: Callable[[bool], dict[str, Any]]
    expected: Callable[[bool], Expected]
    # How many message downloads the provider's fake server has served so far,
    # for providers whose downloads a second import must skip.
    downloads: Callable[[], int] | None = None
