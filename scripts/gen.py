"""Regenerate everything derived from `proto/`: `make gen`.

Writes the Python messages and gRPC stubs (with type stubs) to `gen/python`,
the descriptor set Envoy's transcoder reads to `envoy/ingestion.pb`, and a
copy of the googleapis protos we import to `third_party/googleapis` so that
`buf` resolves them offline. Nothing here is edited by hand.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import google.api
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
GEN_PY = ROOT / "gen" / "python"
THIRD_PARTY = ROOT / "third_party" / "googleapis"
DESCRIPTOR = ROOT / "envoy" / "ingestion.pb"
GOOGLEAPIS = Path(google.api.__path__[0]).parent.parent
GRPC_TOOLS_INCLUDE = Path(protoc.__file__).parent / "_proto"
GOOGLE_PROTOS = [
    "google/api/annotations.proto",
    "google/api/field_behavior.proto",
    "google/api/http.proto",
    "google/api/httpbody.proto",
    "google/rpc/error_details.proto",
    "google/rpc/status.proto",
]


def run_protoc(*args: str) -> None:
    command = [
        "grpc_tools.protoc",
        f"-I{PROTO}",
        f"-I{GOOGLEAPIS}",
        f"-I{GRPC_TOOLS_INCLUDE}",
        *args,
    ]
    if protoc.main(command) != 0:
        sys.exit(f"protoc failed: {' '.join(args)}")


def main() -> None:
    sources = sorted(str(p.relative_to(PROTO)) for p in PROTO.rglob("*.proto"))

    shutil.rmtree(GEN_PY, ignore_errors=True)
    GEN_PY.mkdir(parents=True)
    mypy_grpc = Path(sys.executable).parent / "protoc-gen-mypy_grpc"
    run_protoc(
        f"--plugin=protoc-gen-mypy_grpc={mypy_grpc}",
        f"--python_out={GEN_PY}",
        f"--pyi_out={GEN_PY}",
        f"--grpc_python_out={GEN_PY}",
        f"--mypy_grpc_out={GEN_PY}",
        *sources,
    )
    for package in {p.parent for p in GEN_PY.rglob("*_pb2.py")}:
        while package != GEN_PY:
            (package / "__init__.py").touch()
            package = package.parent
    (GEN_PY / "py.typed").touch()

    # The rpc protos make google.rpc.BadRequest error details render as JSON.
    run_protoc(
        "--include_imports",
        "--include_source_info",
        f"--descriptor_set_out={DESCRIPTOR}",
        *sources,
        "google/rpc/status.proto",
        "google/rpc/error_details.proto",
    )

    shutil.rmtree(THIRD_PARTY, ignore_errors=True)
    for name in GOOGLE_PROTOS:
        target = THIRD_PARTY / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(GOOGLEAPIS / name, target)


if __name__ == "__main__":
    main()
