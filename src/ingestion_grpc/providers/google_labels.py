"""Gmail labels as folder paths.

The folder-like system labels keep their id (`INBOX`, `SENT`, `DRAFT`, `SPAM`,
`TRASH`); a user label is its name, which already spells nesting with `/`
(`Projects/2024`) and is kept as Google stores it, non-ASCII included. User label
ids are opaque (`Label_12`), so they are mapped through `labels.list`. State
labels (`UNREAD`, `STARRED`, `IMPORTANT`, `CATEGORY_*`, `CHAT`) are not folders;
a message with no folder-like label is in `All Mail`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping

from ingestion_grpc.providers.base import JsonDict

logger = logging.getLogger(__name__)

SYSTEM_FOLDERS = ("INBOX", "SENT", "DRAFT", "SPAM", "TRASH")
ALL_MAIL = "All Mail"
# Excluded unless `includeSpamTrash`, as `messages.list` excludes them.
SPAM_AND_TRASH = frozenset({"SPAM", "TRASH"})


def user_label_names(listing: JsonDict) -> dict[str, str]:
    """Id -> name of the user labels in a `labels.list` response."""
    return {
        str(label["id"]): str(label["name"])
        for label in listing.get("labels") or ()
        if label.get("type") == "user" and label.get("id") and label.get("name")
    }


def folder_paths(label_ids: Iterable[str], names: Mapping[str, str]) -> tuple[str, ...]:
    """The folder paths of a message with these labels, system folders first."""
    ids = set(label_ids)
    system = [label for label in SYSTEM_FOLDERS if label in ids]
    user = sorted({names[label] for label in ids if label in names})
    return tuple(system + user) or (ALL_MAIL,)


class LabelNames:
    """A user's label names, listed once and again when an unknown id turns up.

    A label created after the listing shows up on messages by its new id; one
    more `labels.list` (1 quota unit) names it. An id still unknown after that
    (a label deleted meanwhile) is not asked about again.
    """

    def __init__(self, list_labels: Callable[[], JsonDict]) -> None:
        self._list = list_labels
        self._lock = threading.Lock()
        self._names = user_label_names(list_labels())
        self._unknown: set[str] = set()

    def paths(self, label_ids: Iterable[str]) -> tuple[str, ...]:
        ids = list(label_ids)
        with self._lock:
            missing = {
                label for label in ids if label not in self._names and _may_be_user_label(label)
            } - self._unknown
            if missing:
                self._names = user_label_names(self._list())
                still = missing - self._names.keys()
                if still:
                    logger.info("Gmail labels %s are not in labels.list: ignored", sorted(still))
                self._unknown |= still
            return folder_paths(ids, self._names)


def is_folder_label(label: str) -> bool:
    """Whether a label id can name a folder (a folder-like system label or a user label)."""
    return label in SYSTEM_FOLDERS or _may_be_user_label(label)


def _may_be_user_label(label: str) -> bool:
    # System label ids are upper-case words (CATEGORY_SOCIAL too); user ones are Label_<n>.
    return not label.isupper()
