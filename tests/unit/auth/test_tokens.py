from __future__ import annotations

from datetime import timedelta

import pytest

from ingestion_grpc.auth.passwords import hash_password, verify_password
from ingestion_grpc.auth.permissions import ROLE_PERMISSIONS, Permission, Role
from ingestion_grpc.auth.tokens import (
    api_key_hash,
    issue_access_token,
    new_api_key,
    user_id_from_access_token,
)
from ingestion_grpc.errors import Unauthenticated


def test_access_token_round_trip_and_rejections() -> None:
    token = issue_access_token("user-1", "secret-a" * 4, timedelta(minutes=5))
    assert user_id_from_access_token(token, "secret-a" * 4) == "user-1"
    with pytest.raises(Unauthenticated, match="not valid"):
        user_id_from_access_token(token, "secret-b" * 4)
    expired = issue_access_token("user-1", "secret-a" * 4, timedelta(seconds=-1))
    with pytest.raises(Unauthenticated, match="expired"):
        user_id_from_access_token(expired, "secret-a" * 4)


def test_api_keys_are_random_and_stored_as_hashes() -> None:
    first, second = new_api_key(), new_api_key()
    assert first != second and first.startswith("ik_")
    assert len(api_key_hash(first)) == 64 and first not in api_key_hash(first)


def test_passwords() -> None:
    stored = hash_password("correct horse")
    assert stored.startswith("$argon2id$")
    assert verify_password(stored, "correct horse")
    assert not verify_password(stored, "wrong horse")
    assert not verify_password(None, "anything")


def test_roles() -> None:
    assert ROLE_PERMISSIONS[Role.ADMIN] == frozenset(Permission)
    assert Permission.MANAGE_SETTINGS not in ROLE_PERMISSIONS[Role.USER]
    assert ROLE_PERMISSIONS[Role.VIEWER] == {Permission.READ_INGESTION, Permission.READ_ARCHIVE}
