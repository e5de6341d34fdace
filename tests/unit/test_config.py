from __future__ import annotations

from datetime import timedelta

import pytest

from ingestion_grpc.config import Settings, decode_encryption_key, parse_duration
from ingestion_grpc.errors import ConfigurationError

REQUIRED = {
    "DATABASE_URL": "postgresql://db",
    "REDIS_URL": "redis://r",
    "JWT_SECRET": "s" * 32,
    "ENCRYPTION_KEY": "ab" * 32,
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("3600", 3600), ("90s", 90), ("15m", 900), ("12h", 43200), ("7d", 604800)],
)
def test_durations(text: str, expected: int) -> None:
    assert parse_duration(text, "X") == timedelta(seconds=expected)


@pytest.mark.parametrize("text", ["", "0", "-5m", "7 days", "1w"])
def test_bad_durations_name_the_variable(text: str) -> None:
    with pytest.raises(ConfigurationError, match="JWT_EXPIRES_IN"):
        parse_duration(text, "JWT_EXPIRES_IN")


def test_encryption_key_hex_or_base64_of_32_bytes() -> None:
    assert decode_encryption_key("ab" * 32) == bytes([0xAB]) * 32
    assert decode_encryption_key("q" * 43) == decode_encryption_key("q" * 43 + "=")
    for bad in ("ab" * 16, "not a key!"):
        with pytest.raises(ConfigurationError, match="ENCRYPTION_KEY"):
            decode_encryption_key(bad)


def test_defaults_and_required_variables() -> None:
    settings = Settings.from_env({**REQUIRED, "DATA_DIR": "/srv/archive"})
    assert settings.jwt_expires_in == timedelta(days=7)
    assert settings.sync_interval == timedelta(minutes=5)
    assert str(settings.import_root) == "/srv/archive/imports"
    assert settings.enable_deletion_default is False
    for name in REQUIRED:
        with pytest.raises(ConfigurationError, match=name):
            Settings.from_env({k: v for k, v in REQUIRED.items() if k != name})
