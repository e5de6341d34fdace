"""What proto/ingestion/v1 promises other languages' clients: the same file options
in every file (so every generator puts every file in one package), and a gRPC
service config that names real methods and retries only the idempotent reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]
DESCRIPTOR = ROOT / "envoy" / "ingestion.pb"
SERVICE_CONFIG = ROOT / "proto" / "ingestion" / "v1" / "ingestion_service_config.json"
LANGUAGE_OPTIONS = {
    "csharp_namespace": "Ingestion.V1",
    "go_package": "example.com/ingestion-grpc/gen/go/ingestion/v1;ingestionv1",
    "java_multiple_files": True,
    "java_package": "com.example.ingestion.v1",
    "php_namespace": "Ingestion\\V1",
    "ruby_package": "Ingestion::V1",
}


def our_files() -> list[descriptor_pb2.FileDescriptorProto]:
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR.read_bytes()).file
    return [f for f in files if f.package == "ingestion.v1"]


def methods() -> dict[str, descriptor_pb2.MethodDescriptorProto]:
    """`Service/Method` -> its descriptor, for every rpc of ingestion.v1."""
    return {
        f"{service.name}/{method.name}": method
        for proto_file in our_files()
        for service in proto_file.service
        for method in service.method
    }


@pytest.mark.parametrize("proto_file", our_files(), ids=lambda f: f.name)
def test_every_proto_file_has_the_language_options(
    proto_file: descriptor_pb2.FileDescriptorProto,
) -> None:
    options = proto_file.options
    assert {name: getattr(options, name) for name in LANGUAGE_OPTIONS} == LANGUAGE_OPTIONS
    stem = Path(proto_file.name).stem
    assert options.java_outer_classname == "".join(p.title() for p in stem.split("_")) + "Proto"


def service_config() -> dict[str, Any]:
    config: dict[str, Any] = json.loads(SERVICE_CONFIG.read_text(encoding="utf-8"))
    return config


def named_methods(method_config: dict[str, Any]) -> set[str]:
    """`Service/Method` of every rpc a method config applies to (a name without a method
    is the whole service)."""
    names = set()
    for name in method_config["name"]:
        service = name["service"].removeprefix("ingestion.v1.")
        matching = {m for m in methods() if m.startswith(f"{service}/")}
        assert matching, f"no service {name['service']}"
        if "method" in name:
            assert f"{service}/{name['method']}" in matching, f"no rpc {name}"
            names.add(f"{service}/{name['method']}")
        else:
            names |= matching
    return names


def test_the_service_config_retries_only_idempotent_reads() -> None:
    for method_config in service_config()["methodConfig"]:
        if "retryPolicy" not in method_config:
            continue
        assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
        for name in named_methods(method_config):
            rule = methods()[name].options.Extensions[annotations_pb2.http]
            assert rule.WhichOneof("pattern") == "get", f"{name} is retried but is not a read"


def test_the_service_config_gives_every_rpc_but_uploads_a_timeout() -> None:
    timed = set()
    for method_config in service_config()["methodConfig"]:
        if "timeout" in method_config:
            timed |= named_methods(method_config)
    # An upload may take hours: the client sets its own deadline, if any.
    assert set(methods()) - timed == {"UploadService/UploadFile"}
