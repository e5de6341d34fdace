"""Opaque page tokens for keyset pagination: (timestamp, id) of the last item."""

from __future__ import annotations

import base64
import json
from datetime import datetime

from ingestion_grpc.errors import InvalidArgument


def page_size(requested: int, default: int, maximum: int) -> int:
    if requested < 0 or requested > maximum:
        raise InvalidArgument("pageSize", f"must be from 1 to {maximum}")
    return requested or default


def encode_token(moment: datetime, item_id: str) -> str:
    raw = json.dumps([moment.isoformat(), item_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> tuple[datetime, str] | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        moment, item_id = json.loads(raw)
        return datetime.fromisoformat(moment), str(item_id)
    except (ValueError, TypeError):
        raise InvalidArgument("pageToken", "is not a token this API returned") from None


def encode_name_token(name: str, item_id: str) -> str:
    """A token for lists ordered by (name, id) rather than by time."""
    raw = json.dumps([name, item_id], ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_name_token(token: str) -> tuple[str, str] | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        name, item_id = json.loads(raw)
        if not isinstance(name, str) or not isinstance(item_id, str):
            raise TypeError(name)
        return name, item_id
    except (ValueError, TypeError):
        raise InvalidArgument("pageToken", "is not a token this API returned") from None
