"""Whose address a sign-in is counted under: Envoy's word only from a trusted proxy."""

from __future__ import annotations

from ipaddress import ip_network
from typing import cast

import grpc
import pytest

from ingestion_grpc.api.auth import client_address

LOOPBACK = (ip_network("127.0.0.0/8"), ip_network("::1/128"))


class Call:
    """What `client_address` reads of a gRPC call: its peer and its metadata."""

    def __init__(self, peer: str, metadata: dict[str, str]) -> None:
        self._peer = peer
        self._metadata = tuple(metadata.items())

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


@pytest.mark.parametrize(
    ("peer", "metadata", "expected"),
    [
        # Envoy on loopback: the client it saw.
        ("ipv4:127.0.0.1:50000", {"x-client-address": "203.0.113.9"}, "203.0.113.9"),
        ("ipv6:[::1]:50000", {"x-client-address": "2001:db8::1"}, "2001:db8::1"),
        # A direct client elsewhere: its own address, whatever it claims.
        ("ipv4:198.51.100.7:40000", {"x-client-address": "203.0.113.9"}, "198.51.100.7"),
        ("ipv6:[2001:db8::7]:40000", {}, "2001:db8::7"),
        # A trusted peer without the header, or with a bad one: the peer.
        ("ipv4:127.0.0.1:50000", {}, "127.0.0.1"),
        ("ipv4:127.0.0.1:50000", {"x-client-address": "not an address"}, "127.0.0.1"),
    ],
)
def test_the_address_counted(peer: str, metadata: dict[str, str], expected: str) -> None:
    call = cast(grpc.ServicerContext, Call(peer, metadata))
    assert client_address(call, LOOPBACK) == expected
