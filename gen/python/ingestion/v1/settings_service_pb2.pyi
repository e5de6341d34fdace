from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class SystemSettings(_message.Message):
    __slots__ = ("enable_deletion",)
    ENABLE_DELETION_FIELD_NUMBER: _ClassVar[int]
    enable_deletion: bool
    def __init__(self, enable_deletion: _Optional[bool] = ...) -> None: ...

class GetSystemSettingsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UpdateSystemSettingsRequest(_message.Message):
    __slots__ = ("enable_deletion",)
    ENABLE_DELETION_FIELD_NUMBER: _ClassVar[int]
    enable_deletion: bool
    def __init__(self, enable_deletion: _Optional[bool] = ...) -> None: ...
