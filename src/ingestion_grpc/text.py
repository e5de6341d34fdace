"""Rules for text that comes from outside: how long, and which characters.

One place for the API's request checks (`api/validation.py`) and the providers'
config checks (`providers/base.py`). An error names the field and the rule, and
never quotes the value: it may be a megabyte long, or a secret.
"""

from __future__ import annotations

from dataclasses import dataclass

from ingestion_grpc.errors import InvalidArgument

_LINE_CONTROLS = frozenset("\t\n\r")


@dataclass(frozen=True)
class TextRule:
    """How long a string may be, and whether it may hold line breaks and tabs.

    Other control characters (NUL above all: PostgreSQL cannot store it, and a
    C library stops reading at it) are never allowed.
    """

    max_chars: int
    multiline: bool = False


def is_control(char: str) -> bool:
    """C0 controls (NUL to US), DEL and the C1 controls."""
    code = ord(char)
    return code < 0x20 or 0x7F <= code < 0xA0


def check_text(field: str, value: str, rule: TextRule) -> None:
    """Raise InvalidArgument naming `field` if `value` breaks `rule`."""
    if len(value) > rule.max_chars:
        raise InvalidArgument(field, f"must be at most {rule.max_chars} characters")
    for char in value:
        if is_control(char) and not (rule.multiline and char in _LINE_CONTROLS):
            raise InvalidArgument(
                field,
                "must not contain control characters"
                + ("" if rule.multiline else " (NUL, line breaks, tabs)"),
            )
