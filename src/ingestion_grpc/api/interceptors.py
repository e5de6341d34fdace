"""Cross-cutting concerns of every RPC: errors, authentication, permissions.

They run inside the gRPC server, so a client calling the gRPC port directly
meets the same checks as a REST client coming through Envoy.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from ingestion.v1 import (
    archive_service_pb2,
    audit_service_pb2,
    auth_service_pb2,
    ingestion_service_pb2,
    settings_service_pb2,
    upload_service_pb2,
)

from ingestion_grpc import errors
from ingestion_grpc.api.status import response_metadata, to_status
from ingestion_grpc.auth import services as auth
from ingestion_grpc.auth.permissions import Permission, Principal
from ingestion_grpc.db.session import Database

log = logging.getLogger(__name__)

Behavior = Callable[..., Any]
Continuation = Callable[[grpc.HandlerCallDetails], "grpc.RpcMethodHandler[Any, Any] | None"]

if TYPE_CHECKING:
    # grpc-stubs makes these generic; at run time they are plain classes.
    _ServerInterceptor = grpc.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.ServerInterceptor

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")


def current_principal() -> Principal:
    """The caller of the RPC being served (set by AuthInterceptor)."""
    return _principal.get()


def _method(module: Any, service: str, method: str) -> str:
    # Looked up in the descriptor so that a renamed rpc fails at import time.
    descriptor = module.DESCRIPTOR.services_by_name[service]
    return f"/{descriptor.full_name}/{descriptor.methods_by_name[method].name}"


_INGESTION = (ingestion_service_pb2, "IngestionService")
_API_KEYS = (auth_service_pb2, "ApiKeyService")
_ARCHIVE = (archive_service_pb2, "ArchiveService")
_SETTINGS = (settings_service_pb2, "SettingsService")
_UPLOAD = (upload_service_pb2, "UploadService")
_AUDIT = (audit_service_pb2, "AuditService")

# None: any authenticated caller (API keys act only on the caller's own keys).
METHOD_PERMISSIONS: dict[str, Permission | None] = {
    _method(*_INGESTION, "CreateIngestionSource"): Permission.CREATE_INGESTION,
    _method(*_INGESTION, "ListIngestionSources"): Permission.READ_INGESTION,
    _method(*_INGESTION, "GetIngestionSource"): Permission.READ_INGESTION,
    _method(*_INGESTION, "UpdateIngestionSource"): Permission.UPDATE_INGESTION,
    _method(*_INGESTION, "DeleteIngestionSource"): Permission.DELETE_INGESTION,
    _method(*_INGESTION, "TriggerInitialImport"): Permission.CREATE_INGESTION,
    _method(*_INGESTION, "PauseIngestionSource"): Permission.UPDATE_INGESTION,
    _method(*_INGESTION, "ForceSync"): Permission.SYNC_INGESTION,
    _method(*_INGESTION, "ListSyncSessions"): Permission.READ_INGESTION,
    _method(*_INGESTION, "ListSyncSessionMailboxes"): Permission.READ_INGESTION,
    _method(*_ARCHIVE, "ListArchivedEmails"): Permission.READ_ARCHIVE,
    _method(*_ARCHIVE, "GetArchivedEmail"): Permission.READ_ARCHIVE,
    _method(*_ARCHIVE, "GetArchivedEmailRaw"): Permission.READ_ARCHIVE,
    _method(*_API_KEYS, "CreateApiKey"): None,
    _method(*_API_KEYS, "ListApiKeys"): None,
    _method(*_API_KEYS, "DeleteApiKey"): None,
    _method(*_SETTINGS, "GetSystemSettings"): Permission.MANAGE_SETTINGS,
    _method(*_SETTINGS, "UpdateSystemSettings"): Permission.MANAGE_SETTINGS,
    _method(*_UPLOAD, "UploadFile"): Permission.CREATE_INGESTION,
    _method(*_AUDIT, "ListAuditEvents"): Permission.READ_AUDIT,
}
OPEN_METHODS = frozenset({_method(auth_service_pb2, "AuthService", "Login")})
OPEN_SERVICE_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any], around: Callable[[Behavior, bool], Behavior]
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler with `around(behavior, streams_response)` in front."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(around(handler.unary_unary, False), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(around(handler.unary_stream, True), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(around(handler.stream_unary, False), **kwargs)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(around(handler.stream_stream, True), **kwargs)


def _abort(context: grpc.ServicerContext, error: errors.IngestionError) -> None:
    metadata = response_metadata(error)
    if metadata:
        context.send_initial_metadata(metadata)
    context.abort_with_status(to_status(error))


class ErrorInterceptor(_ServerInterceptor):
    """Turns the error tree into statuses; anything else is a logged INTERNAL.

    A streaming response is built by the servicer before its first message, so
    an error always arrives as a status and never as a cut-off JSON array.
    """

    def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None:
            return None
        return wrap_handler(
            handler, lambda behavior, streams: self._guard(behavior, streams, details)
        )

    @staticmethod
    def _guard(behavior: Behavior, streams: bool, details: grpc.HandlerCallDetails) -> Behavior:
        def unexpected(context: grpc.ServicerContext) -> None:
            log.exception("unexpected error in %s", details.method)
            context.abort(grpc.StatusCode.INTERNAL, "Internal error.")

        if streams:

            def guarded_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from behavior(request, context)
                except errors.IngestionError as error:
                    _abort(context, error)
                except Exception:
                    if _already_aborted(context):
                        raise
                    unexpected(context)

            return guarded_stream

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return behavior(request, context)
            except errors.IngestionError as error:
                _abort(context, error)
            except Exception:
                if _already_aborted(context):
                    raise
                unexpected(context)

        return guarded


def _already_aborted(context: grpc.ServicerContext) -> bool:
    # ServicerContext.code() exists at run time; grpc-stubs does not know it.
    code = context.code()  # type: ignore[attr-defined]
    return code is not None and code != grpc.StatusCode.OK


class AuthInterceptor(_ServerInterceptor):
    """Authenticates every call but the open ones and checks its permission."""

    def __init__(self, database: Database, jwt_secret: str) -> None:
        self._database = database
        self._jwt_secret = jwt_secret

    def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        method = details.method
        if handler is None or method in OPEN_METHODS or method.startswith(OPEN_SERVICE_PREFIXES):
            return handler
        if method not in METHOD_PERMISSIONS:
            # Deny by default: a new rpc must be given a permission here.
            log.error("rpc %s has no permission configured; refusing it", method)
            return wrap_handler(handler, lambda _b, _s: self._refuse)
        needed = METHOD_PERMISSIONS[method]
        return wrap_handler(
            handler, lambda behavior, streams: self._authorize(behavior, streams, needed)
        )

    @staticmethod
    def _refuse(request: Any, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "This method is not available.")

    def _authorize(self, behavior: Behavior, streams: bool, needed: Permission | None) -> Behavior:
        def principal_for(context: grpc.ServicerContext) -> Principal:
            metadata = {key: value for key, value in context.invocation_metadata()}
            with self._database.unit_of_work() as uow:
                principal = auth.authenticate(
                    uow,
                    authorization=_text(metadata.get("authorization")),
                    api_key=_text(metadata.get("x-api-key")),
                    jwt_secret=self._jwt_secret,
                )
            if needed is not None and needed not in principal.permissions:
                raise errors.PermissionDenied(f"This needs the {needed} permission.")
            return principal

        if streams:

            def authorized_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                token = _principal.set(principal_for(context))
                try:
                    yield from behavior(request, context)
                finally:
                    _principal.reset(token)

            return authorized_stream

        def authorized(request: Any, context: grpc.ServicerContext) -> Any:
            token = _principal.set(principal_for(context))
            try:
                return behavior(request, context)
            finally:
                _principal.reset(token)

        return authorized


def _text(value: str | bytes | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
