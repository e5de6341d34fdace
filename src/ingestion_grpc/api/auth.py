"""AuthService and ApiKeyService."""

from __future__ import annotations

from datetime import timedelta

import grpc
from google.protobuf import empty_pb2
from ingestion.v1 import auth_service_pb2 as pb
from ingestion.v1 import auth_service_pb2_grpc, resources_pb2

from ingestion_grpc.api.http import HttpStatus, set_http_status
from ingestion_grpc.api.interceptors import current_principal
from ingestion_grpc.api.mapping import api_key_to_proto, user_to_proto
from ingestion_grpc.auth import services as auth
from ingestion_grpc.db.session import Database


class AuthServicer(auth_service_pb2_grpc.AuthServiceServicer):
    def __init__(self, database: Database, jwt_secret: str, token_lifetime: timedelta) -> None:
        self._database = database
        self._jwt_secret = jwt_secret
        self._token_lifetime = token_lifetime

    def Login(self, request: pb.LoginRequest, context: grpc.ServicerContext) -> pb.LoginResponse:
        with self._database.unit_of_work() as uow:
            token, user = auth.login(
                uow, request.email, request.password, self._jwt_secret, self._token_lifetime
            )
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
