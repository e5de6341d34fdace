from __future__ import annotations

import os

import pytest

from ingestion_grpc.crypto import CredentialCipher
from ingestion_grpc.errors import ConfigurationError

CONFIG = {"username": "alice", "password": "hunter2-secret"}


def test_round_trip_and_no_plaintext_at_rest() -> None:
    cipher = CredentialCipher(os.urandom(32))
    sealed = cipher.seal(CONFIG, bound_to="source-1")
    assert b"hunter2-secret" not in sealed
    assert cipher.open(sealed, bound_to="source-1") == CONFIG
    assert cipher.seal(CONFIG, bound_to="source-1") != sealed, "fresh nonce every time"


def test_sealed_config_is_bound_to_its_source_and_key() -> None:
    cipher = CredentialCipher(os.urandom(32))
    sealed = cipher.seal(CONFIG, bound_to="source-1")
    with pytest.raises(ConfigurationError):
        cipher.open(sealed, bound_to="source-2")
    with pytest.raises(ConfigurationError, match="ENCRYPTION_KEY"):
        CredentialCipher(os.urandom(32)).open(sealed, bound_to="source-1")
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(ConfigurationError):
        cipher.open(tampered, bound_to="source-1")
