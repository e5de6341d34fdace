"""The REST checks' rules come from the descriptor set Envoy transcodes with."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from ingestion_grpc.api.rest_rules import FieldKind, lua_rules, rest_field_kinds
from ingestion_grpc.envoy_config import DESCRIPTOR

Field = descriptor_pb2.FieldDescriptorProto


def test_the_apis_bool_and_struct_fields_are_known_by_both_spellings() -> None:
    kinds = rest_field_kinds(DESCRIPTOR)
    assert kinds["enableDeletion"] == kinds["enable_deletion"] == FieldKind.BOOL
    assert kinds["providerConfig"] == kinds["provider_config"] == FieldKind.STRUCT
    assert kinds["name"] == kinds["sessionId"] == kinds["pageSize"] == FieldKind.SCALAR
    # Upload bodies are bytes: no JSON rules, and the Lua filter must not buffer them.
    assert "data" not in kinds
    assert '"^/v1/upload$"' in lua_rules(DESCRIPTOR)


def _descriptor_set(tmp_path: Path, flag_types: list[int]) -> Path:
    file = descriptor_pb2.FileDescriptorProto(name="t.proto", package="t", syntax="proto3")
    service = file.service.add(name="S")
    for index, field_type in enumerate(flag_types):
        message = file.message_type.add(name=f"R{index}")
        message.field.add(
            name="flag", json_name="flag", number=1, type=field_type, label=Field.LABEL_OPTIONAL
        )
        method = service.method.add(
            name=f"M{index}", input_type=f".t.R{index}", output_type=".t.R0"
        )
        method.options.Extensions[annotations_pb2.http].post = f"/v1/m{index}"
    path = tmp_path / "set.pb"
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=[file]).SerializeToString())
    return path


def test_a_name_that_is_a_bool_in_one_request_only_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'flag' is a bool in one message"):
        rest_field_kinds(_descriptor_set(tmp_path, [Field.TYPE_BOOL, Field.TYPE_STRING]))
    assert rest_field_kinds(_descriptor_set(tmp_path, [Field.TYPE_BOOL, Field.TYPE_BOOL])) == {
        "flag": FieldKind.BOOL
    }
