"""AuthService and ApiKeyService."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import timedelta
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import grpc
from google.protobuf import empty_pb2
from ingestion.v1 import auth_service_pb2 as pb
from ingestion.v1 import auth_service_pb2_grpc, resources_pb2

from ingestion_grpc.api.http import HttpStatus, set_http_status
from ingestion_grpc.api.interceptors import current_principal
from ingestion_grpc.api.mapping import api_key_to_proto, user_to_proto
from ingestion_grpc.auth import services as auth
from ingestion_grpc.auth.login_limits import LoginThrottle
from ingestion_grpc.db.session import Database
from ingestion_grpc.errors import Unauthenticated

# Set by Envoy to the address its client connected from (envoy/envoy.yaml.in).
CLIENT_ADDRESS_HEADER = "x-client-address"
Networks = Sequence[IPv4Network | IPv6Network]


def client_address(context: grpc.ServicerContext, trusted_proxies: Networks) -> str:
    """Who is calling: Envoy's `x-client-address` when the peer is a trusted proxy,
    else the peer itself (a direct gRPC client), so a client cannot choose it."""
    peer = _peer_ip(context.peer())
    if peer is None:
        return context.peer()  # a unix socket: one local caller
    if any(peer in network for network in trusted_proxies):
        for key, value in context.invocation_metadata():
            if key == CLIENT_ADDRESS_HEADER:
                given = value.decode() if isinstance(value, bytes) else value
                with contextlib.suppress(ValueError):
                    return str(ip_address(given))
    return str(peer)


def _peer_ip(peer: str) -> IPv4Address | IPv6Address | None:
    """The address in gRPC's `ipv4:1.2.3.4:5` / `ipv6:[::1]:5` peer names."""
    kind, _, rest = peer.partition(":")
    host = rest.rpartition(":")[0].strip("[]")
    if kind not in ("ipv4", "ipv6"):
        return None
    try:
        return ip_address(host)
    except ValueError:
        return None


class AuthServicer(auth_service_pb2_grpc.AuthServiceServicer):
    def __init__(
        self,
        database: Database,
        jwt_secret: str,
        token_lifetime: timedelta,
        throttle: LoginThrottle,
        trusted_proxies: Networks,
    ) -> None:
        self._database = database
        self._jwt_secret = jwt_secret
        self._token_lifetime = token_lifetime
        self._throttle = throttle
        self._trusted_proxies = trusted_proxies

    def Login(self, request: pb.LoginRequest, context: grpc.ServicerContext) -> pb.LoginResponse:
        with self._database.unit_of_work() as uow:
            try:
                token, user = auth.login(
                    uow,
                    request.email,
                    request.password,
                    self._jwt_secret,
                    self._token_lifetime,
                    throttle=self._throttle,
                    client_address=client_address(context, self._trusted_proxies),
                )
            except Unauthenticated:
                uow.commit()  # the refusal's audit event
                raise
            return pb.LoginResponse(access_token=token, user=user_to_proto(user))


class ApiKeyServicer(auth_service_pb2_grpc.ApiKeyServiceServicer):
    def __init__(self, database: Database) -> None:
        self._database = database

    def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: grpc.ServicerContext
    ) -> resources_pb2.ApiKey:
        with self._database.unit_of_work() as uow:
            created = auth.create_api_key(
                uow, current_principal(), request.name, request.expires_in_days
            )
            uow.commit()
        set_http_status(context, HttpStatus.CREATED)
        return api_key_to_proto(created.record, secret=created.secret)

    def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: grpc.ServicerContext
    ) -> pb.ListApiKeysResponse:
        with self._database.unit_of_work() as uow:
            keys = auth.list_api_keys(uow, current_principal())
            return pb.ListApiKeysResponse(api_keys=[api_key_to_proto(k) for k in keys])

    def DeleteApiKey(
        self, request: pb.DeleteApiKeyRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        with self._database.unit_of_work() as uow:
            auth.revoke_api_key(uow, current_principal(), request.id)
            uow.commit()
        set_http_status(context, HttpStatus.NO_CONTENT)
        return empty_pb2.Empty()
