"""The outermost interceptor: every RPC counted and timed by method and status code,
and its log lines tagged with Envoy's request id (and the source it is about).

Outermost, so the code it records is the one the client gets, after the error
interceptor has mapped the error tree to statuses. A streaming response is timed
until its last message is sent; a client that goes away counts as CANCELLED.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc

from ingestion_grpc.api.interceptors import Behavior, Continuation, _ServerInterceptor, wrap_handler
from ingestion_grpc.telemetry import context, metrics

REQUEST_ID_HEADER = "x-request-id"
# Requests of this service whose `id` field is a source's id.
_SOURCE_SERVICE = "/ingestion.v1.IngestionService/"


def _rpc_type(handler: grpc.RpcMethodHandler[Any, Any]) -> str:
    if handler.unary_unary:
        return "unary"
    if handler.unary_stream:
        return "server_stream"
    if handler.stream_unary:
        return "client_stream"
    return "bidi_stream"


def _code(context_: grpc.ServicerContext, raised: bool) -> str:
    # ServicerContext.code() exists at run time; grpc-stubs does not know it.
    code = context_.code()  # type: ignore[attr-defined]
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    # An exception nobody turned into a status reaches the client as UNKNOWN.
    return "UNKNOWN" if raised else "OK"


def _request_id(details: grpc.HandlerCallDetails) -> str | None:
    for key, value in details.invocation_metadata or ():
        if key == REQUEST_ID_HEADER:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


class MetricsInterceptor(_ServerInterceptor):
    def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None:
            return None
        service, _, method = details.method.lstrip("/").partition("/")
        labels = (service, method, _rpc_type(handler))
        request_id = _request_id(details)
        names_source = details.method.startswith(_SOURCE_SERVICE) and not handler.request_streaming
        return wrap_handler(
            handler,
            lambda behavior, streams: _observed(
                behavior, streams, labels, request_id, names_source
            ),
        )


def _source_id(request: Any, names_source: bool) -> str | None:
    value = getattr(request, "id", None) if names_source else None
    return value if isinstance(value, str) and value else None


def _observed(
    behavior: Behavior,
    streams: bool,
    labels: tuple[str, str, str],
    request_id: str | None,
    names_source: bool,
) -> Behavior:
    def finish(started: float, context_: grpc.ServicerContext, code: str | None) -> None:
        metrics.RPC_HANDLED.labels(*labels, code or _code(context_, raised=False)).inc()
        metrics.RPC_SECONDS.labels(*labels).observe(time.perf_counter() - started)

    if streams:

        def observed_stream(request: Any, context_: grpc.ServicerContext) -> Iterator[Any]:
            metrics.RPC_STARTED.labels(*labels).inc()
            started = time.perf_counter()
            code: str | None = None
            try:
                with context.bound(
                    request_id=request_id, source_id=_source_id(request, names_source)
                ):
                    yield from behavior(request, context_)
            except GeneratorExit:
                code = "CANCELLED"
                raise
            except BaseException:
                code = _code(context_, raised=True)
                raise
            finally:
                finish(started, context_, code)

        return observed_stream

    def observed(request: Any, context_: grpc.ServicerContext) -> Any:
        metrics.RPC_STARTED.labels(*labels).inc()
        started = time.perf_counter()
        code: str | None = None
        try:
            with context.bound(request_id=request_id, source_id=_source_id(request, names_source)):
                return behavior(request, context_)
        except BaseException:
            code = _code(context_, raised=True)
            raise
        finally:
            finish(started, context_, code)

    return observed
