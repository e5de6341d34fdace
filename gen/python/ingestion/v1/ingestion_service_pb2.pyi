from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from ingestion.v1 import resources_pb2 as _resources_pb2
from ingestion.v1 import rest_options_pb2 as _rest_options_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateIngestionSourceRequest(_message.Message):
    __slots__ = ("name", "provider", "provider_config")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_CONFIG_FIELD_NUMBER: _ClassVar[int]
    name: str
    provider: str
    provider_config: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., provider: _Optional[str] = ..., provider_config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ListIngestionSourcesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetIngestionSourceRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class UpdateIngestionSourceRequest(_message.Message):
    __slots__ = ("id", "name", "provider", "status", "provider_config")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_CONFIG_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    provider: str
    status: str
    provider_config: _struct_pb2.Struct
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., provider: _Optional[str] = ..., status: _Optional[str] = ..., provider_config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class DeleteIngestionSourceRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class TriggerInitialImportRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class PauseIngestionSourceRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ForceSyncRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class OperationAcceptedResponse(_message.Message):
    __slots__ = ("message", "sync_session_id")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SYNC_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    message: str
    sync_session_id: str
    def __init__(self, message: _Optional[str] = ..., sync_session_id: _Optional[str] = ...) -> None: ...

class ListSyncSessionsRequest(_message.Message):
    __slots__ = ("id", "page_size", "page_token")
    ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    id: str
    page_size: int
    page_token: str
    def __init__(self, id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSyncSessionsResponse(_message.Message):
    __slots__ = ("sync_sessions", "next_page_token")
    SYNC_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sync_sessions: _containers.RepeatedCompositeFieldContainer[_resources_pb2.SyncSession]
    next_page_token: str
    def __init__(self, sync_sessions: _Optional[_Iterable[_Union[_resources_pb2.SyncSession, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListSyncSessionMailboxesRequest(_message.Message):
    __slots__ = ("id", "session_id", "page_size", "page_token")
    ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    id: str
    session_id: str
    page_size: int
    page_token: str
    def __init__(self, id: _Optional[str] = ..., session_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSyncSessionMailboxesResponse(_message.Message):
    __slots__ = ("mailboxes", "next_page_token")
    MAILBOXES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    mailboxes: _containers.RepeatedCompositeFieldContainer[_resources_pb2.SyncSessionMailbox]
    next_page_token: str
    def __init__(self, mailboxes: _Optional[_Iterable[_Union[_resources_pb2.SyncSessionMailbox, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
