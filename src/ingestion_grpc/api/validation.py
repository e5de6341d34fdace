"""The checks every request of this API gets before its servicer runs.

Every string of every request (each field, each path id, each page token, each
key and text value of a `providerConfig`) must be valid UTF-8, hold no control
character and stay within its length limit; a `providerConfig` may nest only a
few levels. A request that breaks one gets INVALID_ARGUMENT naming the field,
and the value itself is never echoed back (it may be a megabyte long).

The limits are declared here once. They are ceilings for the API as a whole:
the domain and the providers still apply their own rules (a source's name is
1 to 200 characters, `providerConfig.host` is a host name of at most 253).

It runs inside the gRPC server, so REST clients (through Envoy) and native gRPC
clients meet the same checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from ingestion_grpc.api.interceptors import Behavior, Continuation, _ServerInterceptor, wrap_handler
from ingestion_grpc.errors import InvalidArgument
from ingestion_grpc.text import TextRule, check_text

# The services whose requests are checked (health and reflection are not ours).
CHECKED_PACKAGE = "ingestion.v1."

# Any request string not named in TEXT_RULES: ids, page tokens, names, emails.
DEFAULT_TEXT = TextRule(256)
# By the field's JSON name.
TEXT_RULES: dict[str, TextRule] = {
    "password": TextRule(1024),
    # A token carries the last item's sort key (a mailbox's display name).
    "pageToken": TextRule(2048),
}
# Inside a google.protobuf.Struct (`providerConfig`): its keys, and any text
# value (a service account key, a few KB of JSON, is the longest legitimate
# one; each provider declares its own, tighter limits).
STRUCT_KEY = TextRule(128)
STRUCT_TEXT = TextRule(65536, multiline=True)
# Levels of objects and lists in a Struct: a config is an object (1) whose
# values may be lists (2). (The protobuf decoder itself gives up a few dozen
# levels down: `explain_undecodable` names that case too.)
MAX_STRUCT_DEPTH = 4
TOO_DEEP = f"must not nest objects and lists more than {MAX_STRUCT_DEPTH} levels deep"

_STRUCT = "google.protobuf.Struct"


def check_request(request: Message) -> None:
    """Every string of a decoded request, and the depth of its Structs."""
    _check_message(request, "")


def _path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_message(message: Message, prefix: str) -> None:
    for field, value in message.ListFields():
        path = _path(prefix, field.json_name)
        if field.type == FieldDescriptor.TYPE_STRING:
            rule = TEXT_RULES.get(field.json_name, DEFAULT_TEXT)
            for text in value if field.is_repeated else (value,):
                check_text(path, text, rule)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value if field.is_repeated else (value,):
                if item.DESCRIPTOR.full_name == _STRUCT:
                    _check_struct(item, path, 1)
                else:
                    _check_message(item, path)


def _check_struct(struct: Any, path: str, depth: int) -> None:
    if depth > MAX_STRUCT_DEPTH:
        raise _too_deep(path)
    for key, value in struct.fields.items():
        check_text(f"{path} (a key)", key, STRUCT_KEY)
        _check_value(value, f"{path}.{key}", depth)


def _check_value(value: Any, path: str, depth: int) -> None:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        check_text(path, value.string_value, STRUCT_TEXT)
    elif kind == "struct_value":
        _check_struct(value.struct_value, path, depth + 1)
    elif kind == "list_value":
        if depth + 1 > MAX_STRUCT_DEPTH:
            raise _too_deep(path)
        for index, item in enumerate(value.list_value.values):
            _check_value(item, f"{path}[{index}]", depth + 1)


def _too_deep(path: str) -> InvalidArgument:
    # Named by its top-level field: the path to the bottom may be a long chain of keys.
    top = path.split(".", 1)[0].split("[", 1)[0]
    return InvalidArgument(top, TOO_DEEP)


@dataclass(frozen=True)
class Undecodable:
    """A request the protobuf decoder refused, and the InvalidArgument to answer."""

    error: InvalidArgument


def explain_undecodable(descriptor: Descriptor, data: bytes) -> InvalidArgument:
    """Why the decoder refused `data`: invalid UTF-8 in a string, or nesting past
    the decoder's depth limit (a deep `providerConfig`). Named by top-level field."""
    # Slices of a memoryview: walking nested bytes copies nothing.
    for field, payload in _length_delimited(descriptor, memoryview(data)):
        if field.type == FieldDescriptor.TYPE_STRING and not _is_utf8(payload):
            return InvalidArgument(field.json_name, "must be valid UTF-8 text")
        if field.message_type is not None:
            valid_utf8, depth = _scan(field.message_type, payload)
            if not valid_utf8:
                return InvalidArgument(field.json_name, "must be valid UTF-8 text")
            # A Struct level is up to three message levels on the wire.
            if depth > 3 * MAX_STRUCT_DEPTH:
                return _too_deep(field.json_name)
    return InvalidArgument("body", "is not a valid request")


def _is_utf8(data: memoryview) -> bool:
    try:
        str(data, "utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _scan(descriptor: Descriptor, data: memoryview) -> tuple[bool, int]:
    """(every string is UTF-8, how many message levels deep it goes)."""
    # An explicit stack: the bytes may nest deeper than Python's recursion limit.
    stack = [(descriptor, data, 1)]
    deepest = 0
    while stack:
        message_type, payload, depth = stack.pop()
        deepest = max(deepest, depth)
        for field, inner in _length_delimited(message_type, payload):
            if field.type == FieldDescriptor.TYPE_STRING and not _is_utf8(inner):
                return False, deepest
            if field.message_type is not None:
                stack.append((field.message_type, inner, depth + 1))
    return True, deepest


def _length_delimited(
    descriptor: Descriptor, data: memoryview
) -> Iterator[tuple[FieldDescriptor, memoryview]]:
    """The known length-delimited fields of one message's wire bytes (a lenient
    walk: it stops at the first malformed tag instead of raising)."""
    position = 0
    while position < len(data):
        tag, position = _varint(data, position)
        if position < 0:
            return
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            _, position = _varint(data, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == 2:
            length, position = _varint(data, position)
            if position < 0 or position + length > len(data):
                return
            field = descriptor.fields_by_number.get(number)
            if field is not None:
                yield field, data[position : position + length]
            position += length
        else:
            return
        if position < 0:
            return


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    """(value, next position); position -1 when the bytes end mid-varint."""
    result = shift = 0
    while position < len(data):
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
    return 0, -1


class ValidationInterceptor(_ServerInterceptor):
    """Decodes and checks each unary request of this API before the servicer runs.

    Inside the ErrorInterceptor, so its InvalidArgument becomes a 400 with the
    usual field violation. A request the decoder refuses (invalid UTF-8, too
    deep) reaches the servicer as `Undecodable` and is answered here, instead
    of gRPC's INTERNAL "Exception deserializing request!".
    """

    def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None or handler.request_streaming:
            # Streamed requests (uploads) are bytes, not text.
            return handler
        service, _, method = details.method.lstrip("/").partition("/")
        if not service.startswith(CHECKED_PACKAGE):
            return handler
        request_type = (
            descriptor_pool.Default().FindServiceByName(service).FindMethodByName(method).input_type
        )
        checked = wrap_handler(handler, _checked)
        return _with_deserializer(checked, _tolerant_deserializer(request_type))


def _tolerant_deserializer(descriptor: Descriptor) -> Any:
    message_class = message_factory.GetMessageClass(descriptor)

    def deserialize(data: bytes) -> Message | Undecodable:
        try:
            request: Message = message_class.FromString(data)
        except DecodeError:
            return Undecodable(explain_undecodable(descriptor, data))
        return request

    return deserialize


def _with_deserializer(
    handler: grpc.RpcMethodHandler[Any, Any], deserializer: Any
) -> grpc.RpcMethodHandler[Any, Any]:
    behavior = handler.unary_unary or handler.unary_stream
    make = (
        grpc.unary_unary_rpc_method_handler
        if handler.unary_unary
        else grpc.unary_stream_rpc_method_handler
    )
    return make(
        behavior,  # type: ignore[arg-type]
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )


def _checked(behavior: Behavior, streams: bool) -> Behavior:
    def check(request: Any) -> None:
        if isinstance(request, Undecodable):
            raise request.error
        check_request(request)

    if streams:

        def checked_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            check(request)
            yield from behavior(request, context)

        return checked_stream

    def checked(request: Any, context: grpc.ServicerContext) -> Any:
        check(request)
        return behavior(request, context)

    return checked
