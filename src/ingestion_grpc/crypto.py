"""Encryption at rest for provider credentials (AES-256-GCM)."""

from __future__ import annotations

import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ingestion_grpc.errors import ConfigurationError

_NONCE_BYTES = 12
_VERSION = b"\x01"


class CredentialCipher:
    """Seals a JSON object so it can be stored; the row id is bound as associated data.

    Binding the id means a sealed config copied onto another source's row fails
    to open instead of quietly lending that source someone else's credentials.
    """

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, value: dict[str, Any], bound_to: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        plaintext = json.dumps(value, separators=(",", ":")).encode()
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, bound_to.encode())

    def open(self, sealed: bytes, bound_to: str) -> dict[str, Any]:
        if sealed[:1] != _VERSION:
            raise ConfigurationError("stored credentials have an unknown format")
        nonce = sealed[1 : 1 + _NONCE_BYTES]
        try:
            plaintext = self._aead.decrypt(nonce, sealed[1 + _NONCE_BYTES :], bound_to.encode())
        except InvalidTag:
            raise ConfigurationError(
                "stored credentials cannot be decrypted: ENCRYPTION_KEY differs from the one "
                "they were written with"
            ) from None
        value: dict[str, Any] = json.loads(plaintext)
        return value
