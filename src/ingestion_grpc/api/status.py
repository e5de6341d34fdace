"""The error tree -> gRPC status, with google.rpc details where they help."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ingestion_grpc import errors

# Over REST, Envoy maps these on: INVALID_ARGUMENT and FAILED_PRECONDITION
# 400, UNAUTHENTICATED 401, PERMISSION_DENIED 403, NOT_FOUND 404, ABORTED 409,
# RESOURCE_EXHAUSTED 429 (413 or 507 with `x-http-code`, see `http_code`),
# UNAVAILABLE 503.
_CODES: list[tuple[type[errors.IngestionError], int]] = [
    (errors.InvalidArgument, code_pb2.INVALID_ARGUMENT),
    (errors.ConnectionCheckFailed, code_pb2.INVALID_ARGUMENT),
    (errors.FailedPrecondition, code_pb2.FAILED_PRECONDITION),
    (errors.Unauthenticated, code_pb2.UNAUTHENTICATED),
    (errors.PermissionDenied, code_pb2.PERMISSION_DENIED),
    (errors.NotFound, code_pb2.NOT_FOUND),
    (errors.Conflict, code_pb2.ABORTED),
    (errors.Unavailable, code_pb2.UNAVAILABLE),
    (errors.ResourceExhausted, code_pb2.RESOURCE_EXHAUSTED),
]
# The HTTP statuses Envoy's Lua filter may put in place of RESOURCE_EXHAUSTED's 429.
_NARROWED_HTTP = frozenset({413, 507})
# A status travels in the trailers (grpc-message, grpc-status-details-bin), and
# Envoy drops a response whose trailers pass its header limit (a 502). Requests
# are checked so that no error quotes a long value; this is the last guard.
MAX_TEXT_CHARS = 1000


def http_code(error: errors.IngestionError) -> str | None:
    """The `x-http-code` an error's REST answer needs, if any: 413 or 507."""
    if isinstance(error, errors.ResourceExhausted) and error.http_status in _NARROWED_HTTP:
        return str(error.http_status)
    return None


def to_status(error: errors.IngestionError) -> grpc.Status:
    code = next((c for cls, c in _CODES if isinstance(error, cls)), code_pb2.INTERNAL)
    status = status_pb2.Status(code=code, message=_bounded(_message(error)))
    violation = _field_violation(error)
    if violation is not None:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        status.details.append(detail)
    result: grpc.Status = rpc_status.to_status(status)
    return result


def _field_violation(
    error: errors.IngestionError,
) -> error_details_pb2.BadRequest.FieldViolation | None:
    if isinstance(error, errors.InvalidArgument):
        return error_details_pb2.BadRequest.FieldViolation(
            field=_bounded(error.field), description=_bounded(error.description)
        )
    if isinstance(error, errors.ConnectionCheckFailed):
        return error_details_pb2.BadRequest.FieldViolation(
            field="providerConfig", description=_bounded(str(error))
        )
    return None


_CUT = " [...]"


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_TEXT_CHARS else text[: MAX_TEXT_CHARS - len(_CUT)] + _CUT


def _message(error: errors.IngestionError) -> str:
    if isinstance(error, errors.ConnectionCheckFailed):
        return f"Connection check failed: {error}"
    return str(error)
