from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor
REST_RESPONSE_FIELD_NUMBER: _ClassVar[int]
rest_response: _descriptor.FieldDescriptor

class RestResponse(_message.Message):
    __slots__ = ("success_status", "error_statuses", "content_type")
    SUCCESS_STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_STATUSES_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    success_status: int
    error_statuses: _containers.RepeatedScalarFieldContainer[int]
    content_type: str
    def __init__(self, success_status: _Optional[int] = ..., error_statuses: _Optional[_Iterable[int]] = ..., content_type: _Optional[str] = ...) -> None: ...
