"""The error tree -> gRPC status: a status is bounded, whatever an error says."""

from __future__ import annotations

from google.rpc import error_details_pb2, status_pb2

from ingestion_grpc import errors
from ingestion_grpc.api.status import MAX_TEXT_CHARS, to_status


def _decoded(error: errors.IngestionError) -> tuple[status_pb2.Status, str, str]:
    status = to_status(error)
    details = status_pb2.Status.FromString(
        dict(status.trailing_metadata)["grpc-status-details-bin"]
    )
    bad_request = error_details_pb2.BadRequest()
    details.details[0].Unpack(bad_request)
    violation = bad_request.field_violations[0]
    return details, violation.field, violation.description


def test_a_long_error_is_cut_in_the_message_and_its_details() -> None:
    details, field, description = _decoded(errors.InvalidArgument("x" * 5000, "y" * 5000))
    assert len(details.message) <= MAX_TEXT_CHARS
    assert len(field) <= MAX_TEXT_CHARS
    assert len(description) <= MAX_TEXT_CHARS
    assert details.message.endswith(" [...]")


def test_a_short_error_is_kept_whole() -> None:
    details, field, description = _decoded(errors.InvalidArgument("name", "must be 1 to 200"))
    assert (details.message, field, description) == (
        "name: must be 1 to 200",
        "name",
        "must be 1 to 200",
    )
