"""Envoy's bootstrap for one or several gRPC upstreams, and the `ingestion-grpc envoy`
and `worker` subcommands' refusals of bad input (exit 2, one line naming it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingestion_grpc.envoy_config import Upstream, parse_upstreams, render_envoy_config

CLI = str(Path(sys.executable).parent / "ingestion-grpc")


def grpc_cluster(config: Path) -> dict[str, Any]:
    bootstrap = yaml.safe_load(config.read_text())
    (cluster,) = [
        c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "ingestion_grpc"
    ]
    return dict(cluster)


def healthz_min_percent(config: Path) -> int:
    text = config.read_text()
    bootstrap = yaml.safe_load(text)
    manager = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (health,) = [
        f for f in manager["typed_config"]["http_filters"] if f["name"].endswith("health_check")
    ]
    return int(health["typed_config"]["cluster_min_healthy_percentages"]["ingestion_grpc"]["value"])


def endpoints(cluster: dict[str, Any]) -> list[tuple[str, int]]:
    return [
        (
            e["endpoint"]["address"]["socket_address"]["address"],
            e["endpoint"]["address"]["socket_address"]["port_value"],
        )
        for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]


def test_upstreams_parse_from_a_comma_separated_list() -> None:
    assert parse_upstreams("10.0.0.5:50051, api-2.internal:50052,[::1]:7", "GRPC_UPSTREAMS") == [
        Upstream("10.0.0.5", 50051),
        Upstream("api-2.internal", 50052),
        Upstream("::1", 7),
    ]


@pytest.mark.parametrize("text", ["", "10.0.0.5", "host:0", "host:70000", "a:1,,b:2", "::1:5"])
def test_a_bad_upstream_is_refused_naming_the_variable(text: str) -> None:
    with pytest.raises(ValueError, match=r"^GRPC_UPSTREAMS must be host:port"):
        parse_upstreams(text, "GRPC_UPSTREAMS")


def test_one_local_server_by_default(tmp_path: Path) -> None:
    config = render_envoy_config("127.0.0.1", 8080, 50051, 0, tmp_path / "envoy.yaml")
    cluster = grpc_cluster(config)
    assert cluster["type"] == "STATIC"
    assert endpoints(cluster) == [("127.0.0.1", 50051)]
    assert healthz_min_percent(config) == 100


def test_several_upstreams_balanced_healthy_while_one_is(tmp_path: Path) -> None:
    servers = [Upstream("10.0.0.5", 50051), Upstream("10.0.0.6", 50051), Upstream("10.0.0.7", 1)]
    config = render_envoy_config(
        "0.0.0.0", 8080, 50051, 0, tmp_path / "envoy.yaml", upstreams=servers
    )
    cluster = grpc_cluster(config)
    assert cluster["type"] == "STATIC"
    assert endpoints(cluster) == [("10.0.0.5", 50051), ("10.0.0.6", 50051), ("10.0.0.7", 1)]
    # One healthy server of three (33.3 %) keeps /healthz at 200.
    assert healthz_min_percent(config) == 33
    assert cluster["outlier_detection"]["consecutive_local_origin_failure"] == 3


def test_host_names_are_resolved_by_dns(tmp_path: Path) -> None:
    servers = [Upstream("api-1.internal", 50051), Upstream("10.0.0.6", 50051)]
    config = render_envoy_config(
        "0.0.0.0", 8080, 50051, 0, tmp_path / "envoy.yaml", upstreams=servers
    )
    assert grpc_cluster(config)["type"] == "STRICT_DNS"


def run_cli(*args: str, **environment: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args],
        env={"PATH": "/usr/bin:/bin", **environment},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_envoy_without_upstreams_exits_2_naming_the_variable(tmp_path: Path) -> None:
    done = run_cli("envoy", DATA_DIR=str(tmp_path))
    assert done.returncode == 2
    assert done.stderr == (
        "configuration error: GRPC_UPSTREAMS (or --upstream host:port) is not set\n"
    )


def test_envoy_with_a_bad_upstream_exits_2_naming_it(tmp_path: Path) -> None:
    done = run_cli("envoy", "--upstream", "api-1:port", DATA_DIR=str(tmp_path))
    assert done.returncode == 2
    assert done.stderr == (
        "configuration error: --upstream must be host:port[,host:port...] "
        "such as 10.0.0.5:50051, got 'api-1:port'\n"
    )
    assert not (tmp_path / "envoy.yaml").exists()


def test_worker_refuses_zero_processes() -> None:
    done = run_cli("worker", "--processes", "0")
    assert done.returncode == 2
    assert "argument --processes: must be a whole number from 1 up, got '0'" in done.stderr
