"""What Envoy's Lua filter checks in a REST request before the transcoder reads it.

The transcoder is lenient where this API must not be: it takes "yes", "t" or
"1" for a bool (`{"enableDeletion": "yes"}` switched deletion on), and an array
for a single-valued field gets a 400 that names no field. The protobuf the
server receives no longer shows either, so the Lua filter looks at the JSON
body and the query string first, with rules derived here from the descriptor
set Envoy transcodes with (`envoy/ingestion.pb`), so a new field is covered
without anyone listing it:

* a bool field takes a JSON `true` or `false` only (in the query string, the
  words `true` or `false`);
* a single-valued field takes no array, and a string or number field no object;
* a google.protobuf.Struct (`providerConfig`) nests at most MAX_STRUCT_DEPTH
  levels: deeper JSON never reaches the decoder, whose own limit had no name.

The rules go by field name across every request message: this API's request
messages are flat (their fields are scalars or Structs), and a name means the
same kind of field everywhere; `rest_field_kinds` refuses a descriptor where a
bool field's name is used for another kind, so that the check stays sound.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from pathlib import Path

from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from ingestion_grpc.api.validation import MAX_STRUCT_DEPTH, TOO_DEEP

_STRUCT = ".google.protobuf.Struct"
_HTTP_BODY = ".google.api.HttpBody"
# Any JSON at all: Value and ListValue take whatever they are given.
_ANY_JSON = frozenset({".google.protobuf.Value", ".google.protobuf.ListValue"})
_PATH_VARIABLE = re.compile(r"\{[^}]*\}")


class FieldKind(StrEnum):
    BOOL = "bool"
    # A string or a number: no object, no array.
    SCALAR = "scalar"
    # A message other than Struct: an object, no array.
    MESSAGE = "message"
    STRUCT = "struct"
    # Repeated, a map, or free JSON: not checked.
    ANY = "any"


def _kind(field: descriptor_pb2.FieldDescriptorProto) -> FieldKind:
    if field.label == field.LABEL_REPEATED or field.type_name in _ANY_JSON:
        return FieldKind.ANY
    if field.type == field.TYPE_BOOL:
        return FieldKind.BOOL
    if field.type_name == _STRUCT:
        return FieldKind.STRUCT
    if field.type == field.TYPE_MESSAGE:
        return FieldKind.MESSAGE
    return FieldKind.SCALAR


def _descriptor_set(path: Path) -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())


def _messages(files: descriptor_pb2.FileDescriptorSet) -> dict[str, descriptor_pb2.DescriptorProto]:
    return {
        f".{file.package}.{message.name}": message
        for file in files.file
        for message in file.message_type
    }


def _rest_methods(
    files: descriptor_pb2.FileDescriptorSet,
) -> list[tuple[descriptor_pb2.MethodDescriptorProto, str]]:
    """(method, REST path template) for every method with an HTTP binding."""
    found = []
    for file in files.file:
        for service in file.service:
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                pattern = rule.WhichOneof("pattern")
                if pattern is not None and pattern != "custom":
                    found.append((method, getattr(rule, pattern)))
    return found


def rest_field_kinds(descriptor_set: Path) -> dict[str, FieldKind]:
    """Each request field's kind by the names the transcoder takes (JSON and proto)."""
    files = _descriptor_set(descriptor_set)
    messages = _messages(files)
    kinds: dict[str, FieldKind] = {}
    for method, _ in _rest_methods(files):
        request = messages.get(method.input_type)
        if request is None or method.input_type == _HTTP_BODY:  # raw bytes, no JSON
            continue
        for field in request.field:
            kind = _kind(field)
            for name in {field.json_name or field.name, field.name}:
                known = kinds.setdefault(name, kind)
                if known == kind:
                    continue
                if FieldKind.BOOL in (known, kind):
                    raise ValueError(
                        f"request field {name!r} is a bool in one message and not in another:"
                        " the REST bool check (api/rest_rules.py) cannot tell them apart"
                    )
                kinds[name] = FieldKind.ANY
    return {name: kind for name, kind in kinds.items() if kind != FieldKind.ANY}


def streamed_body_patterns(descriptor_set: Path) -> list[str]:
    """Lua patterns of the paths whose body is raw bytes streamed to the server
    (uploads): the Lua filter must not buffer those."""
    files = _descriptor_set(descriptor_set)
    patterns = []
    for method, template in _rest_methods(files):
        if method.input_type == _HTTP_BODY:
            literal = [re.sub(r"([^\w/])", r"%\1", part) for part in _PATH_VARIABLE.split(template)]
            patterns.append("^" + "[^/]+".join(literal) + "$")
    return patterns


def _lua_string(text: str) -> str:
    # A JSON string of printable ASCII is a valid Lua string literal.
    if not (text.isascii() and text.isprintable()):
        raise ValueError(f"not printable ASCII, cannot go into the Lua filter: {text!r}")
    return json.dumps(text)


def lua_rules(descriptor_set: Path) -> str:
    """The rules as one line of Lua, for envoy/envoy.yaml.in's `$REST_RULES`."""
    kinds = rest_field_kinds(descriptor_set)
    fields = ", ".join(
        f"[{_lua_string(name)}] = {_lua_string(kind)}" for name, kind in sorted(kinds.items())
    )
    streamed = ", ".join(_lua_string(p) for p in streamed_body_patterns(descriptor_set))
    return (
        f"local field_kinds = {{{fields}}}; "
        f"local streamed_paths = {{{streamed}}}; "
        f"local max_struct_depth = {MAX_STRUCT_DEPTH}; "
        f"local too_deep = {_lua_string(TOO_DEEP)}"
    )
