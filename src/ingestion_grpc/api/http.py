"""REST status codes that no gRPC status maps to (201, 202, 204).

The server names the code in initial metadata; Envoy's Lua filter applies it
to the transcoded response and drops the header. gRPC clients ignore it.
"""

from __future__ import annotations

from enum import IntEnum

import grpc


class HttpStatus(IntEnum):
    CREATED = 201
    ACCEPTED = 202
    NO_CONTENT = 204


def set_http_status(context: grpc.ServicerContext, status: HttpStatus) -> None:
    context.send_initial_metadata((("x-http-code", str(int(status))),))
