"""Include / exclude glob patterns, as every provider's `include*` / `exclude*` options
read them: `include` first (when given), then `exclude`, fnmatch globs where `*` also
matches "/" (so "Archive/*" takes every level below Archive).

IMAP's `imap_folders.select_folders` has the same rules for its folder type; this is
the generic form, for any item and with an optional case-insensitive match (a
userPrincipalName is case-insensitive, a folder path is compared as written).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")


def matches_any(text: str, patterns: Sequence[str], *, ignore_case: bool = False) -> bool:
    """Whether `text` matches one of `patterns`."""
    if ignore_case:
        text = text.casefold()
        return any(fnmatch.fnmatchcase(text, pattern.casefold()) for pattern in patterns)
    return any(fnmatch.fnmatchcase(text, pattern) for pattern in patterns)


def select(
    items: Iterable[T],
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    *,
    key: Callable[[T], str],
    ignore_case: bool = False,
) -> list[T]:
    """The items whose `key` is included (every item when `include` is empty) and not
    excluded, in their original order."""
    return [
        item
        for item in items
        if (not include or matches_any(key(item), include, ignore_case=ignore_case))
        and not (exclude and matches_any(key(item), exclude, ignore_case=ignore_case))
    ]
