"""The OpenAPI 3.0 document of the REST API, from protoc-gen-swagger's output.

`gen.py` runs Debian's `protoc-gen-swagger` (grpc-gateway 1.6.4, OpenAPI 2.0)
over the protos; it reads the `google.api.http` bindings and the comments.
`build_document` turns its per-file output into one OpenAPI 3.0.3 document
that states what Envoy really serves, using the descriptors for what that
generator cannot know:

- the success status of each rpc (`ingestion.v1.rest_response`: 201, 202, 204
  with no body) and its errors, all shaped like `google.rpc.Status`: those any
  rpc may answer (400 from the transcoder's checks, 401, 503), 403 where the
  server requires a permission, 404 where the path names a resource, and the
  rpc's own (`error_statuses`);
- a server-streaming rpc answers one bare JSON array; one streaming
  `google.api.HttpBody` answers raw bytes of the declared `content_type`, and
  one taking `google.api.HttpBody` takes the raw request body;
- JSON field names (lowerCamel, also in query parameters), `google.protobuf.Struct`
  as a free-form object, path fields left out of request bodies, `required`
  from `google.api.field_behavior` in requests and, in responses, for the
  fields Envoy always prints (scalars and lists without presence);
- the security schemes (a Bearer JWT or an `X-API-KEY`), none on open rpcs.

Anything else in the generator's output that is not understood stops
generation, so a new proto feature is handled here rather than misdescribed.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from google.api import annotations_pb2, field_behavior_pb2, http_pb2
from google.protobuf import descriptor_pb2
from ingestion.v1 import rest_options_pb2

if TYPE_CHECKING:
    from google.protobuf.internal.extension_dict import _ExtensionFieldDescriptor

JsonObject = dict[str, Any]

PACKAGE = "ingestion.v1"
HTTP_BODY = ".google.api.HttpBody"
EMPTY = ".google.protobuf.Empty"
STRUCT = ".google.protobuf.Struct"
TIMESTAMP = ".google.protobuf.Timestamp"
# Rendered as raw bytes, a free-form object, `{}` / no content, an RFC 3339 string.
SPECIAL = frozenset({HTTP_BODY, STRUCT, EMPTY, TIMESTAMP})
TYPE_MESSAGE = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
LABEL_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
HTTP_METHODS = ("get", "put", "post", "delete", "patch")
# protoc's .pyi types a custom option as a plain FieldDescriptor.
REST_RESPONSE = cast(
    "_ExtensionFieldDescriptor[descriptor_pb2.MethodOptions, rest_options_pb2.RestResponse]",
    rest_options_pb2.rest_response,
)

SECURITY_SCHEMES: JsonObject = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "JWT obtained from POST /v1/auth/login. "
        "Pass as `Authorization: Bearer <token>`.",
    },
    "apiKeyAuth": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-KEY",
        "description": "API key generated via POST /v1/api-keys. Pass as `X-API-KEY: <key>`.",
    },
}

# google.rpc.Status as Envoy prints it: from the server through the transcoder
# (`details` holds google.rpc.BadRequest and the like, as JSON `Any`), or made
# by Envoy itself (unknown path or query parameter, malformed JSON, no upstream).
STATUS_SCHEMA: JsonObject = {
    "type": "object",
    "description": "An error, shaped like `google.rpc.Status`. Envoy's own errors "
    "(unknown path or query parameter, malformed JSON, no upstream) have no `details`.",
    "required": ["code", "message"],
    "properties": {
        "code": {
            "type": "integer",
            "format": "int32",
            "description": "The gRPC status code (`google.rpc.Code`), e.g. 3 INVALID_ARGUMENT.",
        },
        "message": {"type": "string", "description": "What went wrong, for people."},
        "details": {
            "type": "array",
            "description": "Machine-readable details, e.g. a `google.rpc.BadRequest` "
            "naming the wrong field.",
            "items": {
                "type": "object",
                "required": ["@type"],
                "properties": {
                    "@type": {
                        "type": "string",
                        "description": "The detail's type URL, e.g. "
                        "`type.googleapis.com/google.rpc.BadRequest`.",
                    }
                },
                "additionalProperties": True,
            },
        },
    },
}

# Status -> (components/responses name, description). The gRPC codes behind
# them are Envoy's mapping (docs/running.md).
ERRORS: dict[int, tuple[str, str]] = {
    400: (
        "BadRequest",
        "INVALID_ARGUMENT or FAILED_PRECONDITION: a field is wrong (named in a "
        "`google.rpc.BadRequest` detail), an unknown query parameter, a body that is "
        "not a JSON object, or what the settings forbid.",
    ),
    401: ("Unauthenticated", "UNAUTHENTICATED: credentials missing, invalid or expired."),
    403: ("PermissionDenied", "PERMISSION_DENIED: the caller lacks the permission."),
    404: ("NotFound", "NOT_FOUND: no such resource, or not one the caller may see."),
    409: (
        "Conflict",
        "ABORTED: the resource's state forbids this now (a run is under way, the "
        "source is paused).",
    ),
    413: ("ContentTooLarge", "RESOURCE_EXHAUSTED: the upload is over `MAX_UPLOAD_BYTES`."),
    429: (
        "TooManyRequests",
        "RESOURCE_EXHAUSTED: too many at once, or too many failed sign-ins; try again "
        "later (after `Retry-After` seconds, when the answer has that header).",
    ),
    503: (
        "Unavailable",
        "UNAVAILABLE: the server, its database or its job queue cannot be reached now.",
    ),
    507: ("InsufficientStorage", "RESOURCE_EXHAUSTED: the server's disk is full."),
}
# Headers some errors carry (e.g. a refused sign-in says when to try again).
ERROR_HEADERS: dict[int, JsonObject] = {
    429: {
        "Retry-After": {
            "description": "Seconds to wait before trying again.",
            "schema": {"type": "integer", "minimum": 1},
        }
    }
}
COMMON_ERRORS = (400, 401, 503)

SUCCESS_DESCRIPTIONS = {
    200: "OK.",
    201: "Created.",
    202: "Accepted: the work is queued.",
    204: "No content.",
}


class DocumentError(Exception):
    """Raised when the generator's output has something this module does not handle."""


@dataclass(frozen=True)
class Rpc:
    service: str
    method: descriptor_pb2.MethodDescriptorProto
    rule: http_pb2.HttpRule
    rest: rest_options_pb2.RestResponse

    @property
    def full_name(self) -> str:
        return f"{PACKAGE}.{self.service}/{self.method.name}"


@dataclass
class Protos:
    """What the descriptors say: messages by full name, rpcs by method name, comments."""

    messages: dict[str, descriptor_pb2.DescriptorProto] = field(default_factory=dict)
    rpcs: dict[str, Rpc] = field(default_factory=dict)
    service_comments: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, files: Iterable[descriptor_pb2.FileDescriptorProto]) -> Protos:
        protos = cls()
        for proto_file in files:
            prefix = f".{proto_file.package}." if proto_file.package else "."
            for message in proto_file.message_type:
                protos._add_message(prefix + message.name, message)
            if proto_file.package != PACKAGE:
                continue
            comments = {
                tuple(location.path): location.leading_comments
                for location in proto_file.source_code_info.location
            }
            for index, service in enumerate(proto_file.service):
                protos.service_comments[service.name] = _clean(comments.get((6, index), ""))
                for method in service.method:
                    if method.name in protos.rpcs:
                        raise DocumentError(f"two rpcs named {method.name}: operationIds clash")
                    options = method.options
                    protos.rpcs[method.name] = Rpc(
                        service.name,
                        method,
                        options.Extensions[annotations_pb2.http],
                        options.Extensions[REST_RESPONSE],
                    )
        return protos

    def _add_message(self, name: str, message: descriptor_pb2.DescriptorProto) -> None:
        self.messages[name] = message
        for nested in message.nested_type:
            self._add_message(f"{name}.{nested.name}", nested)

    def closure(self, roots: Iterable[str]) -> set[str]:
        """The messages reachable from `roots` through message fields (not into the
        types the document renders as something else: HttpBody, Struct)."""
        seen: set[str] = set()
        todo = list(roots)
        while todo:
            name = todo.pop()
            if name in seen or name not in self.messages:
                continue
            seen.add(name)
            if name in SPECIAL:
                continue
            todo.extend(f.type_name for f in self.messages[name].field if f.type == TYPE_MESSAGE)
        return seen


def _clean(comment: str) -> str:
    return "\n".join(line.strip() for line in comment.strip().splitlines())


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _behaviors(proto_field: descriptor_pb2.FieldDescriptorProto) -> set[int]:
    return set(proto_field.options.Extensions[field_behavior_pb2.field_behavior])


def _always_printed(proto_field: descriptor_pb2.FieldDescriptorProto) -> bool:
    """Envoy prints it even when empty (always_print_primitive_fields): a list, or a
    scalar without presence. Unset messages and unset `optional` scalars are left out."""
    if proto_field.label == LABEL_REPEATED:
        return True
    return proto_field.type != TYPE_MESSAGE and not proto_field.proto3_optional


def _path_fields(path: str) -> list[str]:
    return re.findall(r"\{([^}=]+)", path)


class _Builder:
    def __init__(
        self,
        protos: Protos,
        definitions: Mapping[str, JsonObject],
        open_methods: frozenset[str],
        permission_methods: frozenset[str],
    ) -> None:
        self.protos = protos
        self.definitions = definitions
        self.open_methods = open_methods
        self.permission_methods = permission_methods
        self.schemas: dict[str, JsonObject] = {}
        self.used_errors: set[int] = set()
        outputs = [r.method.output_type for r in protos.rpcs.values()]
        inputs = [r.method.input_type for r in protos.rpcs.values()]
        self.output_messages = protos.closure(outputs)
        self.input_messages = protos.closure(inputs)
        both = (self.output_messages & self.input_messages) - SPECIAL
        if both:
            # `required` means something else in a request and in a response.
            raise DocumentError(f"messages used both in requests and responses: {both}")

    # --- schemas ------------------------------------------------------------

    def definition_name(self, full_name: str) -> str:
        package, _, name = full_name.lstrip(".").rpartition(".")
        return f"{package.rpartition('.')[2]}{name}"

    def schema_name(self, full_name: str) -> str:
        if not full_name.startswith(f".{PACKAGE}."):
            raise DocumentError(f"no schema for {full_name}")
        return full_name.removeprefix(f".{PACKAGE}.")

    def ref(self, full_name: str) -> JsonObject:
        """A schema for a message type, adding it to components/schemas as needed."""
        if full_name == STRUCT:
            return {"type": "object", "additionalProperties": True}
        if full_name == EMPTY:
            return {"type": "object"}
        if full_name == TIMESTAMP:
            return {"type": "string", "format": "date-time"}
        name = self.schema_name(full_name)
        if name not in self.schemas:
            self.schemas[name] = {}  # placeholder against recursion
            self.schemas[name] = self.message_schema(full_name)
        return {"$ref": f"#/components/schemas/{name}"}

    def message_schema(self, full_name: str, *, leave_out: Iterable[str] = ()) -> JsonObject:
        message = self.protos.messages[full_name]
        definition = self.definitions.get(self.definition_name(full_name))
        if definition is None:
            raise DocumentError(f"protoc-gen-swagger wrote no definition of {full_name}")
        properties: JsonObject = {}
        required: list[str] = []
        generated = definition.get("properties", {})
        skipped = set(leave_out)
        for proto_field in message.field:
            if proto_field.name in skipped:
                continue
            json_name = proto_field.json_name
            if json_name not in generated:
                raise DocumentError(f"{full_name}.{proto_field.name}: no property {json_name}")
            properties[json_name] = self.property_schema(proto_field, generated[json_name])
            if full_name in self.output_messages:
                if _always_printed(proto_field):
                    required.append(json_name)
            elif field_behavior_pb2.REQUIRED in _behaviors(proto_field):
                required.append(json_name)
        unknown = set(generated) - {f.json_name for f in message.field}
        if unknown:
            raise DocumentError(f"{full_name}: unexpected properties {unknown}")
        schema: JsonObject = {"type": "object"}
        description = _description(definition)
        if description:
            schema["description"] = description
        if required:
            schema["required"] = required
        schema["properties"] = properties
        return schema

    def property_schema(
        self, proto_field: descriptor_pb2.FieldDescriptorProto, generated: JsonObject
    ) -> JsonObject:
        description = _description(generated)
        if proto_field.type == TYPE_MESSAGE:
            item = self.ref(proto_field.type_name)
        else:
            source = generated["items"] if proto_field.label == LABEL_REPEATED else generated
            item = {k: copy.deepcopy(v) for k, v in source.items() if k in ("type", "format")}
            if item.get("type") not in ("string", "integer", "number", "boolean"):
                raise DocumentError(f"{proto_field.name}: unexpected scalar {source}")
        if proto_field.label == LABEL_REPEATED:
            schema: JsonObject = {"type": "array", "items": item}
        elif "$ref" in item:
            # OpenAPI 3.0 ignores siblings of $ref: wrap it to keep the description.
            schema = {"allOf": [item]}
        else:
            schema = dict(item)
        if description:
            schema["description"] = description
        return schema

    # --- operations ------------------------------------------------------------

    def operation(self, path: str, verb: str, generated: JsonObject) -> JsonObject:
        rpc = self.protos.rpcs.get(generated.get("operationId", ""))
        if rpc is None:
            raise DocumentError(f"{verb} {path}: no rpc named {generated.get('operationId')}")
        method = rpc.method
        operation: JsonObject = {"operationId": method.name, "tags": [rpc.service]}
        for key in ("summary", "description"):
            if generated.get(key):
                operation[key] = _clean(generated[key])
        operation["x-grpc-method"] = rpc.full_name
        request = self.protos.messages[method.input_type]
        fields = {f.name: f for f in request.field}
        path_fields = _path_fields(path)
        parameters = []
        for parameter in generated.get("parameters", []):
            where = parameter["in"]
            if where == "body":
                continue
            if where not in ("path", "query"):
                raise DocumentError(f"{method.name}: parameter in {where}")
            proto_field = fields.get(parameter["name"])
            if proto_field is None:
                raise DocumentError(f"{method.name}: no field {parameter['name']}")
            name = parameter["name"] if where == "path" else proto_field.json_name
            schema = {k: parameter[k] for k in ("type", "format") if k in parameter}
            converted: JsonObject = {"name": name, "in": where}
            if parameter.get("description"):
                converted["description"] = _clean(parameter["description"])
            converted["required"] = bool(parameter.get("required"))
            converted["schema"] = schema
            parameters.append(converted)
        if parameters:
            operation["parameters"] = parameters
        if rpc.rule.body:
            operation["requestBody"] = self.request_body(rpc, path_fields)
        operation["responses"] = self.responses(rpc, path_fields)
        if f"/{rpc.full_name}" in self.open_methods:
            operation["security"] = []
        return operation

    def request_body(self, rpc: Rpc, path_fields: list[str]) -> JsonObject:
        method = rpc.method
        if rpc.rule.body != "*":
            raise DocumentError(f"{method.name}: body {rpc.rule.body!r} is not handled")
        if method.input_type == HTTP_BODY:
            return {
                "required": True,
                "description": "The raw bytes, sent as they are, with any `Content-Type`.",
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        schema = self.message_schema(method.input_type, leave_out=path_fields)
        has_required = bool(schema.get("required"))
        if not path_fields:
            schema = self.ref(method.input_type)
        elif not schema["properties"]:
            schema = {"type": "object", "description": "Nothing: `{}`, or no body at all."}
        return {"required": has_required, "content": {"application/json": {"schema": schema}}}

    def responses(self, rpc: Rpc, path_fields: list[str]) -> JsonObject:
        method = rpc.method
        status = rpc.rest.success_status or 200
        if status not in SUCCESS_DESCRIPTIONS:
            raise DocumentError(f"{method.name}: success status {status} is not handled")
        success: JsonObject = {"description": SUCCESS_DESCRIPTIONS[status]}
        if status == 204:
            if method.output_type != EMPTY:
                raise DocumentError(f"{method.name}: 204 drops a {method.output_type}")
        elif method.output_type == HTTP_BODY:
            if not rpc.rest.content_type:
                raise DocumentError(f"{method.name}: HttpBody needs rest_response.content_type")
            success["content"] = {
                rpc.rest.content_type: {"schema": {"type": "string", "format": "binary"}}
            }
        else:
            schema = self.ref(method.output_type)
            if method.server_streaming:
                # Envoy renders a server stream as one JSON array.
                schema = {"type": "array", "items": schema}
            success["content"] = {"application/json": {"schema": schema}}
        responses: JsonObject = {str(status): success}
        errors = set(COMMON_ERRORS) | set(rpc.rest.error_statuses)
        if f"/{rpc.full_name}" in self.permission_methods:
            errors.add(403)
        if path_fields:
            errors.add(404)
        for code in sorted(errors):
            if code not in ERRORS:
                raise DocumentError(f"{method.name}: error status {code} is not handled")
            self.used_errors.add(code)
            responses[str(code)] = {"$ref": f"#/components/responses/{ERRORS[code][0]}"}
        return responses


def _description(generated: Mapping[str, Any]) -> str:
    parts = [generated.get("title", ""), generated.get("description", "")]
    return "\n\n".join(_clean(p) for p in parts if p and p.strip())


def build_document(
    swagger_files: Iterable[JsonObject],
    descriptor_files: Iterable[descriptor_pb2.FileDescriptorProto],
    *,
    open_methods: frozenset[str],
    permission_methods: frozenset[str],
) -> JsonObject:
    """One OpenAPI 3.0.3 document from protoc-gen-swagger's per-file documents.

    `open_methods` and `permission_methods` are gRPC paths (`/pkg.Service/Method`):
    the rpcs that need no credentials, and those that need a permission.
    """
    protos = Protos.load(descriptor_files)
    paths: dict[str, JsonObject] = {}
    definitions: dict[str, JsonObject] = {}
    for swagger in swagger_files:
        if swagger.get("swagger") != "2.0":
            raise DocumentError("not an OpenAPI 2.0 document")
        for name, definition in swagger.get("definitions", {}).items():
            if definitions.setdefault(name, definition) != definition:
                raise DocumentError(f"two different definitions named {name}")
        for path, operations in swagger.get("paths", {}).items():
            for verb, operation in operations.items():
                if verb not in HTTP_METHODS:
                    raise DocumentError(f"{path}: unexpected key {verb}")
                if verb in paths.setdefault(path, {}):
                    raise DocumentError(f"{verb} {path} is bound twice")
                paths[path][verb] = operation

    builder = _Builder(protos, definitions, open_methods, permission_methods)
    out_paths: JsonObject = {}
    seen: set[str] = set()
    for path in sorted(paths):
        out_paths[path] = {}
        for verb in HTTP_METHODS:
            if verb in paths[path]:
                operation = builder.operation(path, verb, paths[path][verb])
                seen.add(operation["operationId"])
                out_paths[path][verb] = operation
    unbound = set(protos.rpcs) - seen
    if unbound:
        raise DocumentError(f"rpcs without a REST binding in the document: {sorted(unbound)}")

    services = sorted({rpc.service for rpc in protos.rpcs.values()})
    builder.schemas["Status"] = STATUS_SCHEMA
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Ingestion API",
            "version": "v1",
            "description": "The REST API of the email-archive ingestion service, as Envoy "
            "serves it: each operation is a gRPC method of `ingestion.v1` (named in "
            "`x-grpc-method`), transcoded to JSON. Generated by `make gen` from the protos "
            "in `proto/ingestion/v1`; do not edit.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}, {"apiKeyAuth": []}],
        "tags": [
            {"name": name, "description": protos.service_comments.get(name, "")}
            for name in services
        ],
        "paths": out_paths,
        "components": {
            "schemas": {name: builder.schemas[name] for name in sorted(builder.schemas)},
            "responses": {
                ERRORS[code][0]: {
                    "description": ERRORS[code][1],
                    **({"headers": ERROR_HEADERS[code]} if code in ERROR_HEADERS else {}),
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Status"}}
                    },
                }
                for code in sorted(builder.used_errors)
            },
            "securitySchemes": SECURITY_SCHEMES,
        },
    }
