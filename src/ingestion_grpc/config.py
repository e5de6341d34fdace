"""Process configuration, read once from the environment.

The server and the workers need every value here to be explicit; `ingestion-grpc
run` (the `make run` stack) fills in embedded defaults before it starts them.
"""

from __future__ import annotations

import base64
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from ingestion_grpc.errors import ConfigurationError

Environ = Mapping[str, str]

_DURATION = re.compile(r"^(\d+)\s*([smhd]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^(\d+)\s*([kmgt]?)(?:i?b)?$")
_UNIT_BYTES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(text: str, variable: str) -> timedelta:
    """Parse `3600`, `90s`, `15m`, `12h` or `7d`."""
    match = _DURATION.match(text.strip().lower())
    if not match or int(match.group(1)) <= 0:
        raise ConfigurationError(f"{variable} must be a positive duration like 7d, 12h or 300s")
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def parse_size(text: str, variable: str) -> int:
    """Parse a byte count: `1048576`, or with a binary suffix `500K`, `500M`, `10G`, `1T`
    (also written `10GB` or `10GiB`; every suffix counts in powers of 1024)."""
    match = _SIZE.match(text.strip().lower())
    if not match or int(match.group(1)) <= 0:
        raise ConfigurationError(f"{variable} must be a positive size like 10G, 500M or 1048576")
    return int(match.group(1)) * _UNIT_BYTES[match.group(2)]


def parse_bool(text: str, variable: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigurationError(f"{variable} must be true or false")


def parse_port(text: str, variable: str, *, allow_zero: bool = True) -> int:
    """A TCP port number (0 = pick a free one, where allowed)."""
    lowest = 0 if allow_zero else 1
    if not re.fullmatch(r"\s*\d{1,5}\s*", text) or not lowest <= int(text) <= 65535:
        raise ConfigurationError(f"{variable} must be a port number from {lowest} to 65535")
    return int(text)


def parse_log_level(text: str, variable: str) -> str:
    level = text.strip().upper()
    if level not in logging.getLevelNamesMapping():
        raise ConfigurationError(f"{variable} must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


LOG_FORMATS = ("text", "json")


def parse_log_format(text: str, variable: str) -> str:
    value = text.strip().lower()
    if value not in LOG_FORMATS:
        raise ConfigurationError(f"{variable} must be text or json")
    return value


def parse_url(text: str, variable: str) -> str:
    """An http(s) base URL, without a trailing slash."""
    url = text.strip().rstrip("/")
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", url):
        raise ConfigurationError(f"{variable} must be an http(s) URL such as https://example.com")
    return url


# S3's rules for bucket names (3-63 characters; DNS-style, no "..").
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def parse_archive_url(text: str, variable: str) -> str:
    """`file:///absolute/path` or `s3://bucket[/prefix]`, normalised (no trailing `/`)."""
    url = urlsplit(text.strip())
    if url.scheme == "file" and url.netloc in ("", "localhost") and url.path.startswith("/"):
        path = Path(unquote(url.path)).resolve()
        return "file://" + quote(str(path))
    if (
        url.scheme == "s3"
        and _BUCKET.fullmatch(url.netloc)
        and ".." not in url.netloc
        and not url.query
        and not url.fragment
    ):
        prefix = unquote(url.path).strip("/")
        if not prefix:
            return f"s3://{url.netloc}"
        if all(part not in ("", ".", "..") for part in prefix.split("/")):
            return f"s3://{url.netloc}/{quote(prefix)}"
    raise ConfigurationError(
        f"{variable} must be file:///absolute/path or s3://bucket/prefix "
        "(a bucket name of 3-63 lowercase letters, digits, dots and hyphens)"
    )


def parse_limit(text: str, variable: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        raise ConfigurationError(f"{variable} must be a positive number")
    return value


def parse_count(text: str, variable: str) -> int:
    """A positive whole number."""
    if not re.fullmatch(r"\s*\d+\s*", text) or int(text) <= 0:
        raise ConfigurationError(f"{variable} must be a positive whole number")
    return int(text)


def parse_networks(text: str, variable: str) -> tuple[IPv4Network | IPv6Network, ...]:
    """Comma-separated IP addresses or CIDR networks (`127.0.0.0/8,::1`); may be empty."""
    try:
        return tuple(ip_network(part.strip()) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigurationError(
            f"{variable} must be IP addresses or networks like 127.0.0.1,10.0.0.0/8"
        ) from None


def decode_encryption_key(text: str) -> bytes:
    """Accept a 32-byte key as 64 hex digits or as (url-safe) base64."""
    text = text.strip()
    try:
        key = (
            bytes.fromhex(text)
            if re.fullmatch(r"[0-9a-fA-F]{64}", text)
            else (base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        )
    except ValueError as exc:
        raise ConfigurationError("ENCRYPTION_KEY is neither hex nor base64") from exc
    if len(key) != 32:
        raise ConfigurationError("ENCRYPTION_KEY must encode exactly 32 bytes (AES-256)")
    return key


def _required(environ: Environ, name: str) -> str:
    value = environ.get(name, "").strip()
    if not value:
        raise ConfigurationError(f"{name} is not set")
    return value


@dataclass(frozen=True)
class Settings:
    """Everything a server or worker process needs to run."""

    data_dir: Path
    database_url: str
    redis_url: str
    jwt_secret: str
    jwt_expires_in: timedelta
    encryption_key: bytes
    grpc_port: int
    enable_deletion_default: bool
    sync_interval: timedelta
    import_root: Path
    upload_root: Path
    max_upload_bytes: int
    queue_namespace: str
    stale_run_after: timedelta
    scheduler_tick: timedelta
    # PROMETHEUS_MULTIPROC_DIR: where every process of the node writes its metrics.
    metrics_dir: Path
    # The server's Prometheus listener; 0 picks a free port.
    metrics_port: int = 0
    log_level: str = "INFO"
    log_format: str = "text"
    admin_email: str = "admin@example.com"
    admin_password: str | None = None
    # "" = Google's own endpoints.
    google_api_endpoint: str = ""
    microsoft_authority_host: str = "https://login.microsoftonline.com"
    microsoft_graph_endpoint: str = "https://graph.microsoft.com"
    # LIMIT_<NAME>=<number>: operator overrides of providers' declared limits.
    limit_overrides: Mapping[str, float] = field(default_factory=dict)
    # PROVIDER_PLUGINS=module:Class,...: more providers (tests, private ones).
    provider_plugins: tuple[str, ...] = ()
    # Where message bytes go: file:///path or s3://bucket/prefix ("" = DATA_DIR/blobs).
    archive_url: str = ""
    # An S3-compatible store's URL (MinIO, Ceph, R2); "" = AWS's own endpoints.
    s3_endpoint_url: str = ""
    # An upload no source uses is removed this long after it was made.
    upload_ttl: timedelta = timedelta(hours=24)
    # Failed sign-ins allowed per account and per client address in a window.
    login_max_failures_per_account: int = 10
    login_max_failures_per_address: int = 100
    login_failure_window: timedelta = timedelta(minutes=15)
    # Peers whose `x-client-address` (set by Envoy) is believed; from any other
    # peer a call's client address is the peer's own.
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = (
        ip_network("127.0.0.0/8"),
        ip_network("::1/128"),
    )

    @classmethod
    def from_env(cls, environ: Environ = os.environ) -> Settings:
        """Every variable, read and checked; ConfigurationError names a bad one."""
        data_dir = Path(environ.get("DATA_DIR", "./data")).resolve()
        google = environ.get("GOOGLE_API_ENDPOINT", "").strip()
        archive_url, s3_endpoint_url = archive_location(environ, data_dir)
        return cls(
            data_dir=data_dir,
            database_url=_required(environ, "DATABASE_URL"),
            redis_url=_required(environ, "REDIS_URL"),
            jwt_secret=_required(environ, "JWT_SECRET"),
            jwt_expires_in=parse_duration(environ.get("JWT_EXPIRES_IN", "7d"), "JWT_EXPIRES_IN"),
            encryption_key=decode_encryption_key(_required(environ, "ENCRYPTION_KEY")),
            grpc_port=parse_port(environ.get("GRPC_PORT", "50051"), "GRPC_PORT"),
            enable_deletion_default=parse_bool(
                environ.get("ENABLE_DELETION", "false"), "ENABLE_DELETION"
            ),
            sync_interval=parse_duration(environ.get("SYNC_INTERVAL", "5m"), "SYNC_INTERVAL"),
            import_root=Path(environ.get("IMPORT_ROOT", str(data_dir / "imports"))).resolve(),
            upload_root=Path(environ.get("UPLOAD_ROOT", str(data_dir / "uploads"))).resolve(),
            max_upload_bytes=parse_size(environ.get("MAX_UPLOAD_BYTES", "10G"), "MAX_UPLOAD_BYTES"),
            queue_namespace=environ.get("QUEUE_NAMESPACE", "dramatiq"),
            stale_run_after=parse_duration(environ.get("STALE_RUN_AFTER", "2m"), "STALE_RUN_AFTER"),
            scheduler_tick=parse_duration(environ.get("SCHEDULER_TICK", "15s"), "SCHEDULER_TICK"),
            metrics_dir=metrics_dir(environ, data_dir),
            metrics_port=parse_port(environ.get("METRICS_PORT", "0"), "METRICS_PORT"),
            log_level=parse_log_level(environ.get("LOG_LEVEL", "INFO"), "LOG_LEVEL"),
            log_format=parse_log_format(environ.get("LOG_FORMAT", "text"), "LOG_FORMAT"),
            admin_email=environ.get("ADMIN_EMAIL", "").strip() or "admin@example.com",
            admin_password=environ.get("ADMIN_PASSWORD") or None,
            google_api_endpoint=parse_url(google, "GOOGLE_API_ENDPOINT") if google else "",
            microsoft_authority_host=parse_url(
                environ.get("MICROSOFT_AUTHORITY_HOST", "https://login.microsoftonline.com"),
                "MICROSOFT_AUTHORITY_HOST",
            ),
            microsoft_graph_endpoint=parse_url(
                environ.get("MICROSOFT_GRAPH_ENDPOINT", "https://graph.microsoft.com"),
                "MICROSOFT_GRAPH_ENDPOINT",
            ),
            limit_overrides={
                name.removeprefix(LIMIT_PREFIX).lower(): parse_limit(value, name)
                for name, value in environ.items()
                if name.startswith(LIMIT_PREFIX)
            },
            provider_plugins=tuple(
                p.strip() for p in environ.get("PROVIDER_PLUGINS", "").split(",") if p.strip()
            ),
            archive_url=archive_url,
            s3_endpoint_url=s3_endpoint_url,
            upload_ttl=parse_duration(environ.get("UPLOAD_TTL", "24h"), "UPLOAD_TTL"),
            login_max_failures_per_account=parse_count(
                environ.get("LOGIN_MAX_FAILURES_PER_ACCOUNT", "10"),
                "LOGIN_MAX_FAILURES_PER_ACCOUNT",
            ),
            login_max_failures_per_address=parse_count(
                environ.get("LOGIN_MAX_FAILURES_PER_ADDRESS", "100"),
                "LOGIN_MAX_FAILURES_PER_ADDRESS",
            ),
            login_failure_window=parse_duration(
                environ.get("LOGIN_FAILURE_WINDOW", "15m"), "LOGIN_FAILURE_WINDOW"
            ),
            trusted_proxies=parse_networks(
                environ.get("TRUSTED_PROXIES", "127.0.0.0/8,::1"), "TRUSTED_PROXIES"
            ),
        )


def archive_location(environ: Environ, data_dir: Path) -> tuple[str, str]:
    """ARCHIVE_URL (default: DATA_DIR/blobs) and S3_ENDPOINT_URL, checked: for
    Settings, and for `verify`, which reads the archive without the service's
    other settings."""
    s3_endpoint = environ.get("S3_ENDPOINT_URL", "").strip()
    archive_url = parse_archive_url(
        environ.get("ARCHIVE_URL", "").strip() or f"file://{quote(str(data_dir))}/blobs",
        "ARCHIVE_URL",
    )
    return archive_url, parse_url(s3_endpoint, "S3_ENDPOINT_URL") if s3_endpoint else ""


LIMIT_PREFIX = "LIMIT_"


def metrics_dir(environ: Environ, data_dir: Path) -> Path:
    """PROMETHEUS_MULTIPROC_DIR (prometheus-client's own variable), else DATA_DIR/metrics."""
    given = environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
    return Path(given).resolve() if given else data_dir / "metrics"


@dataclass(frozen=True)
class StackSettings:
    """What `ingestion-grpc run` itself needs before the rest exists (it makes the
    secrets and the embedded databases, then starts the parts with Settings)."""

    data_dir: Path
    http_host: str
    http_port: int
    grpc_port: int
    envoy_admin_port: int
    metrics_dir: Path
    # 0: the stack picks a free port for the server's listener (Envoy serves it).
    metrics_port: int = 0
    log_format: str = "text"

    @classmethod
    def from_env(cls, environ: Environ = os.environ) -> StackSettings:
        data_dir = Path(environ.get("DATA_DIR", "./data")).resolve()
        return cls(
            data_dir=data_dir,
            http_host=environ.get("HTTP_HOST", "0.0.0.0").strip() or "0.0.0.0",
            http_port=parse_port(environ.get("HTTP_PORT", "8080"), "HTTP_PORT", allow_zero=False),
            grpc_port=parse_port(environ.get("GRPC_PORT", "50051"), "GRPC_PORT", allow_zero=False),
            envoy_admin_port=parse_port(environ.get("ENVOY_ADMIN_PORT", "0"), "ENVOY_ADMIN_PORT"),
            metrics_dir=metrics_dir(environ, data_dir),
            metrics_port=parse_port(environ.get("METRICS_PORT", "0"), "METRICS_PORT"),
            log_format=parse_log_format(environ.get("LOG_FORMAT", "text"), "LOG_FORMAT"),
        )


# Where the client commands look for the service when neither --url nor
# INGESTION_URL says: `make run`'s Envoy.
DEFAULT_SERVICE_URL = "http://localhost:8080"
_TARGET = re.compile(r"^(?:(https?)://)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?/?$")


def parse_service_url(text: str, variable: str) -> tuple[str, bool]:
    """`http://host:port`, `https://host[:port]` or `host:port` as (gRPC target, TLS?).

    Plain `host:port` and `http://` are plaintext (Envoy's port, or the server's
    own); `https://` is TLS, on port 443 unless one is given.
    """
    match = _TARGET.match(text.strip())
    port = int(match.group(3)) if match and match.group(3) else None
    if not match or (port is not None and not 1 <= port <= 65535):
        raise ConfigurationError(
            f"{variable} must be a service address like http://localhost:8080 or host:50051"
        )
    scheme, host = match.group(1), match.group(2)
    secure = scheme == "https"
    default_port = 443 if secure else 80 if scheme == "http" else 8080
    return f"{host}:{port or default_port}", secure


@dataclass(frozen=True)
class ClientSettings:
    """What the client commands (`ingestion-grpc sources ...`, `import-file`) need:
    where the service is and the API key they act with. A flag wins over its variable."""

    target: str
    secure: bool
    api_key: str | None

    @classmethod
    def from_env(
        cls,
        environ: Environ = os.environ,
        *,
        url: str | None = None,
        api_key: str | None = None,
    ) -> ClientSettings:
        if url is not None:
            target, secure = parse_service_url(url, "--url")
        else:
            given = environ.get("INGESTION_URL", "").strip() or DEFAULT_SERVICE_URL
            target, secure = parse_service_url(given, "INGESTION_URL")
        key = api_key if api_key is not None else environ.get("INGESTION_API_KEY", "")
        return cls(target=target, secure=secure, api_key=key.strip() or None)
