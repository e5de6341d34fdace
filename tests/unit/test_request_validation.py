"""What the tolerant request decoder says about bytes protobuf refuses."""

from __future__ import annotations

import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from ingestion.v1 import ingestion_service_pb2 as pb

from ingestion_grpc.api.validation import TOO_DEEP, explain_undecodable
from tests.support.wire import field, nested_struct

CREATE = pb.CreateIngestionSourceRequest
INVALID_UTF8 = "must be valid UTF-8 text"


def _refused(data: bytes) -> tuple[str, str]:
    with pytest.raises(DecodeError):
        CREATE.FromString(data)
    error = explain_undecodable(CREATE.DESCRIPTOR, data)
    return error.field, error.description


def test_the_field_with_invalid_utf8_is_named_not_an_earlier_valid_one() -> None:
    config = struct_pb2.Struct()
    config.update({"host": "h", "folders": ["a", "b"]})
    data = field(3, config.SerializeToString()) + field(1, b"ok") + field(2, b"\xff")
    assert _refused(data) == ("provider", INVALID_UTF8)


def test_invalid_utf8_deep_inside_a_struct_names_the_struct() -> None:
    data = field(1, b"n") + field(3, nested_struct(3, leaf=b"\xc3"))
    assert _refused(data) == ("providerConfig", INVALID_UTF8)


def test_nesting_past_the_decoder_is_named_too_deep() -> None:
    data = field(1, b"n") + field(3, nested_struct(200))
    assert _refused(data) == ("providerConfig", TOO_DEEP)
