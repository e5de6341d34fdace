"""Raw protobuf for tests: requests a well-behaved client library cannot write
(invalid UTF-8, nesting past the decoder's limit)."""

from __future__ import annotations


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (a string, bytes or a message)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def nested_struct(levels: int, leaf: bytes = b"leaf") -> bytes:
    """A google.protobuf.Struct {"a": {"a": ... leaf}} of `levels` objects."""
    value = field(3, leaf)  # Value.string_value
    struct = b""
    for _ in range(levels):
        struct = field(1, field(1, b"a") + field(2, value))  # Struct.fields entry
        value = field(5, struct)  # Value.struct_value
    return struct
