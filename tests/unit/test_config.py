from __future__ import annotations

from datetime import timedelta

import pytest

from ingestion_grpc import bootstrap
from ingestion_grpc.config import ClientSettings, Settings, decode_encryption_key, parse_duration
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


def test_metrics_and_log_format_settings() -> None:
    settings = Settings.from_env({**REQUIRED, "DATA_DIR": "/srv/archive"})
    assert settings.metrics_port == 0
    assert str(settings.metrics_dir) == "/srv/archive/metrics"
    assert settings.log_format == "text"
    chosen = Settings.from_env(
        {**REQUIRED, "METRICS_PORT": "9464", "LOG_FORMAT": "JSON", "PROMETHEUS_MULTIPROC_DIR": "/m"}
    )
    assert (chosen.metrics_port, chosen.log_format, str(chosen.metrics_dir)) == (9464, "json", "/m")
    for name, bad in (("METRICS_PORT", "abc"), ("METRICS_PORT", "70000"), ("LOG_FORMAT", "xml")):
        with pytest.raises(ConfigurationError, match=name):
            Settings.from_env({**REQUIRED, name: bad})


@pytest.mark.parametrize(
    ("url", "target", "secure"),
    [
        ("http://localhost:8080", "localhost:8080", False),
        ("localhost:50051", "localhost:50051", False),
        ("https://archive.example.com", "archive.example.com:443", True),
        ("[::1]:8080", "[::1]:8080", False),
    ],
)
def test_client_settings_read_the_service_url(url: str, target: str, secure: bool) -> None:
    settings = ClientSettings.from_env({"INGESTION_URL": url, "INGESTION_API_KEY": " k "})
    assert (settings.target, settings.secure, settings.api_key) == (target, secure, "k")


def test_client_flags_win_and_bad_urls_name_where_they_came_from() -> None:
    environ = {"INGESTION_URL": "http://env:1", "INGESTION_API_KEY": "env-key"}
    settings = ClientSettings.from_env(environ, url="flag:2", api_key="flag-key")
    assert (settings.target, settings.api_key) == ("flag:2", "flag-key")
    assert ClientSettings.from_env({}).target == "localhost:8080"
    assert ClientSettings.from_env({}).api_key is None
    with pytest.raises(ConfigurationError, match="INGESTION_URL"):
        ClientSettings.from_env({"INGESTION_URL": "ftp://x/y"})
    with pytest.raises(ConfigurationError, match="--url"):
        ClientSettings.from_env({}, url="http://host:99999")


def test_archive_url_defaults_to_files_under_data_dir_and_accepts_s3() -> None:
    assert Settings.from_env({**REQUIRED, "DATA_DIR": "/srv/archive"}).archive_url == (
        "file:///srv/archive/blobs"
    )
    for given, normalised in (
        ("file:///mnt/blobs/", "file:///mnt/blobs"),
        ("s3://my-archive", "s3://my-archive"),
        ("s3://my-archive/", "s3://my-archive"),
        ("s3://my.archive-2/mail/prod/", "s3://my.archive-2/mail/prod"),
    ):
        settings = Settings.from_env({**REQUIRED, "ARCHIVE_URL": given})
        assert settings.archive_url == normalised
    chosen = Settings.from_env({**REQUIRED, "S3_ENDPOINT_URL": "http://minio:9000/"})
    assert chosen.s3_endpoint_url == "http://minio:9000"
    assert Settings.from_env(REQUIRED).s3_endpoint_url == ""


@pytest.mark.parametrize(
    "bad",
    [
        "/srv/blobs",  # no scheme
        "file://relative/path",
        "ftp://host/x",
        "s3://",  # no bucket
        "s3:///prefix",
        "s3://ab",  # too short
        "s3://Upper-Case",
        "s3://bad..bucket",
        "s3://bucket/a//b",
        "s3://bucket/../x",
        "s3://bucket/x?versioning=1",
    ],
)
def test_bad_archive_urls_name_the_variable(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="ARCHIVE_URL"):
        Settings.from_env({**REQUIRED, "ARCHIVE_URL": bad})


def test_a_bad_s3_endpoint_names_the_variable() -> None:
    with pytest.raises(ConfigurationError, match="S3_ENDPOINT_URL"):
        Settings.from_env({**REQUIRED, "S3_ENDPOINT_URL": "minio:9000"})


def test_a_bad_archive_url_stops_the_start_with_one_line_and_status_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        bootstrap.settings_or_exit({**REQUIRED, "ARCHIVE_URL": "s3://"})
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.startswith("configuration error: ARCHIVE_URL must be")
