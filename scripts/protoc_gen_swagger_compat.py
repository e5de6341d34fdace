"""A protoc plugin in front of Debian's `protoc-gen-swagger` (grpc-gateway 1.6.4).

That generator predates proto3 `optional` fields and protoc refuses to run it on
files that have them. For OpenAPI 2.0 every field is optional anyway, so this
wrapper hands it the request with each `optional` field turned back into a plain
field (its synthetic oneof removed), and tells protoc that the answer supports
proto3 optional. Which fields really have presence is read by `openapi_doc.py`
from the descriptors, not from this plugin's output.

Usage (protoc needs an executable; `gen.py` writes a two-line shim):
    python protoc_gen_swagger_compat.py /usr/bin/protoc-gen-swagger < request > response
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2


def strip_proto3_optional(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for message in messages:
        synthetic: set[int] = set()
        for field in message.field:
            if field.proto3_optional:
                synthetic.add(field.oneof_index)
                field.ClearField("proto3_optional")
                field.ClearField("oneof_index")
        if synthetic:
            # Synthetic oneofs come after the real ones, so real indexes stay valid.
            kept = [o for i, o in enumerate(message.oneof_decl) if i not in synthetic]
            del message.oneof_decl[:]
            message.oneof_decl.extend(kept)
        strip_proto3_optional(message.nested_type)


def main() -> None:
    plugin = sys.argv[1]
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    for proto_file in request.proto_file:
        strip_proto3_optional(proto_file.message_type)
    answer = subprocess.run(
        [plugin], input=request.SerializeToString(), stdout=subprocess.PIPE, check=True
    ).stdout
    response = plugin_pb2.CodeGeneratorResponse.FromString(answer)
    response.supported_features |= plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    sys.stdout.buffer.write(response.SerializeToString())


if __name__ == "__main__":
    main()
