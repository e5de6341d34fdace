"""Opaque page tokens for keyset pagination: (timestamp or name, id) of the last item."""

from __future__ import annotations

import base64
import json
from datetime import datetime

from ingestion_grpc.errors import InvalidArgument


def page_size(requested: int, default: int, maximum: int) -> int:
    if requested < 0 or requested > maximum:
        raise InvalidArgument("pageSize", f"must be from 1 to {maximum}")
    return requested or default


def _encode(key: str, item_id: str) -> str:
    raw = json.dumps([key, item_id], ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(token: str) -> tuple[str, str] | None:
    if not token:
        return None
    try:
        key, item_id = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not isinstance(key, str) or not isinstance(item_id, str):
            raise TypeError(key)
        for text in (key, item_id):
            # No stored sort key or id holds a NUL or a lone surrogate (a "\\ud800"
            # escape): PostgreSQL refuses both. encode() raises UnicodeEncodeError.
            if "\0" in text:
                raise ValueError(key)
            text.encode()
        return key, item_id
    except (ValueError, TypeError):
        raise InvalidArgument("pageToken", "is not a token this API returned") from None


def encode_token(moment: datetime, item_id: str) -> str:
    return _encode(moment.isoformat(), item_id)


def decode_token(token: str) -> tuple[datetime, str] | None:
    decoded = _decode(token)
    if decoded is None:
        return None
    try:
        return datetime.fromisoformat(decoded[0]), decoded[1]
    except ValueError:
        raise InvalidArgument("pageToken", "is not a token this API returned") from None


def encode_name_token(name: str, item_id: str) -> str:
    """A token for lists ordered by (name, id) rather than by time."""
    return _encode(name, item_id)


def decode_name_token(token: str) -> tuple[str, str] | None:
    return _decode(token)
