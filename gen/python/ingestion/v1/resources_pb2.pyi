import datetime

from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IngestionSource(_message.Message):
    __slots__ = ("id", "name", "provider", "status", "created_at", "updated_at", "last_sync_started_at", "last_sync_finished_at", "last_sync_status_message")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SYNC_STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SYNC_FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SYNC_STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    provider: str
    status: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    last_sync_started_at: _timestamp_pb2.Timestamp
    last_sync_finished_at: _timestamp_pb2.Timestamp
    last_sync_status_message: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., provider: _Optional[str] = ..., status: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_sync_started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_sync_finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_sync_status_message: _Optional[str] = ...) -> None: ...

class User(_message.Message):
    __slots__ = ("id", "email", "role")
    ID_FIELD_NUMBER: _ClassVar[int]
    EMAIL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    id: str
    email: str
    role: str
    def __init__(self, id: _Optional[str] = ..., email: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class ApiKey(_message.Message):
    __slots__ = ("id", "name", "key", "expires_at", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    key: str
    expires_at: _timestamp_pb2.Timestamp
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., key: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SyncSession(_message.Message):
    __slots__ = ("id", "source_id", "kind", "status", "started_at", "finished_at", "mailboxes_total", "mailboxes_done", "mailboxes_failed", "messages_fetched", "messages_archived", "messages_already_present", "messages_failed", "error_message", "messages_skipped", "mailboxes_skipped")
    ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    MAILBOXES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MAILBOXES_DONE_FIELD_NUMBER: _ClassVar[int]
    MAILBOXES_FAILED_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FETCHED_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_ARCHIVED_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FAILED_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    MAILBOXES_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    id: str
    source_id: str
    kind: str
    status: str
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    mailboxes_total: int
    mailboxes_done: int
    mailboxes_failed: int
    messages_fetched: int
    messages_archived: int
    messages_already_present: int
    messages_failed: int
    error_message: str
    messages_skipped: int
    mailboxes_skipped: int
    def __init__(self, id: _Optional[str] = ..., source_id: _Optional[str] = ..., kind: _Optional[str] = ..., status: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., mailboxes_total: _Optional[int] = ..., mailboxes_done: _Optional[int] = ..., mailboxes_failed: _Optional[int] = ..., messages_fetched: _Optional[int] = ..., messages_archived: _Optional[int] = ..., messages_already_present: _Optional[int] = ..., messages_failed: _Optional[int] = ..., error_message: _Optional[str] = ..., messages_skipped: _Optional[int] = ..., mailboxes_skipped: _Optional[int] = ...) -> None: ...

class SyncSessionMailbox(_message.Message):
    __slots__ = ("mailbox", "display_name", "state", "messages_fetched", "messages_archived", "messages_already_present", "messages_skipped", "messages_failed", "error_message", "updated_at")
    MAILBOX_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FETCHED_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_ARCHIVED_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FAILED_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    mailbox: str
    display_name: str
    state: str
    messages_fetched: int
    messages_archived: int
    messages_already_present: int
    messages_skipped: int
    messages_failed: int
    error_message: str
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, mailbox: _Optional[str] = ..., display_name: _Optional[str] = ..., state: _Optional[str] = ..., messages_fetched: _Optional[int] = ..., messages_archived: _Optional[int] = ..., messages_already_present: _Optional[int] = ..., messages_skipped: _Optional[int] = ..., messages_failed: _Optional[int] = ..., error_message: _Optional[str] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ArchivedEmail(_message.Message):
    __slots__ = ("id", "source_id", "mailbox", "folder_paths", "message_id", "subject", "from_address", "to", "cc", "sent_at", "size_bytes", "sha256", "has_attachments", "provider_message_id", "archived_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    MAILBOX_FIELD_NUMBER: _ClassVar[int]
    FOLDER_PATHS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    FROM_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    CC_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    HAS_ATTACHMENTS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    ARCHIVED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    source_id: str
    mailbox: str
    folder_paths: _containers.RepeatedScalarFieldContainer[str]
    message_id: str
    subject: str
    from_address: str
    to: _containers.RepeatedScalarFieldContainer[str]
    cc: _containers.RepeatedScalarFieldContainer[str]
    sent_at: _timestamp_pb2.Timestamp
    size_bytes: int
    sha256: str
    has_attachments: bool
    provider_message_id: str
    archived_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., source_id: _Optional[str] = ..., mailbox: _Optional[str] = ..., folder_paths: _Optional[_Iterable[str]] = ..., message_id: _Optional[str] = ..., subject: _Optional[str] = ..., from_address: _Optional[str] = ..., to: _Optional[_Iterable[str]] = ..., cc: _Optional[_Iterable[str]] = ..., sent_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., has_attachments: _Optional[bool] = ..., provider_message_id: _Optional[str] = ..., archived_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
