"""Native gRPC clients meet the same request checks as REST: on the server's own
port too, where no Envoy filter runs. The requests are written as raw protobuf,
since a well-behaved client library cannot send invalid UTF-8."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.support.services import ADMIN_EMAIL, ADMIN_PASSWORD
from tests.support.wire import field, nested_struct

GET_SOURCE = "/ingestion.v1.IngestionService/GetIngestionSource"
CREATE_SOURCE = "/ingestion.v1.IngestionService/CreateIngestionSource"
LOGIN = "/ingestion.v1.AuthService/Login"


def _call(channel: grpc.Channel, method: str, request: bytes) -> grpc.RpcError:
    login = field(1, ADMIN_EMAIL.encode()) + field(2, ADMIN_PASSWORD.encode())
    # No serializers: the requests and responses are raw bytes.
    token_response = channel.unary_unary(LOGIN, None, None)(login)
    token = _first_string(token_response)
    call = channel.unary_unary(method, None, None)
    with pytest.raises(grpc.RpcError) as raised:
        call(request, metadata=(("authorization", f"Bearer {token}"),))
    return raised.value


def _first_string(message: bytes) -> str:
    # LoginResponse.access_token is field 1: tag, length, text.
    assert message[0] == 0x0A
    length, position, shift = 0, 1, 0
    while True:
        byte = message[position]
        position += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return message[position : position + length].decode()


def _violation(error: grpc.RpcError) -> error_details_pb2.BadRequest.FieldViolation:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad_request)
    return bad_request.field_violations[0]


@pytest.mark.parametrize(
    ("method", "request_bytes", "field"),
    [
        (GET_SOURCE, field(1, b"\xff\xfe"), "id"),
        (GET_SOURCE, field(1, b"a\x00b"), "id"),
        (GET_SOURCE, field(1, b"x" * 300), "id"),
        (CREATE_SOURCE, field(1, b"n\xc3") + field(2, b"fake_tenant"), "name"),
        (CREATE_SOURCE, field(1, b"n") + field(3, nested_struct(5)), "providerConfig"),
        (CREATE_SOURCE, field(1, b"n") + field(3, nested_struct(60)), "providerConfig"),
        (CREATE_SOURCE, field(1, b"n") + field(3, nested_struct(200)), "providerConfig"),
    ],
    ids=["invalid utf-8", "nul", "too long", "cut utf-8", "deep", "deeper", "past the decoder"],
)
def test_bad_text_over_grpc_is_invalid_argument_naming_thefield(
    grpc_channel: grpc.Channel, method: str, request_bytes: bytes, field: str
) -> None:
    violation = _violation(_call(grpc_channel, method, request_bytes))
    assert violation.field == field
    assert len(violation.description) < 200
