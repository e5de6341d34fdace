"""UploadService: files for the file imports, streamed to UPLOAD_ROOT.

Over REST, Envoy's transcoder turns the raw request body of `POST /v1/upload`
into a stream of `google.api.HttpBody` messages as the bytes arrive; native
gRPC clients send that stream themselves. Either way the file goes to disk
piece by piece (`domain/uploads.py`) and is never held whole in memory.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator

import grpc
from google.api import httpbody_pb2
from ingestion.v1 import upload_service_pb2 as pb
from ingestion.v1 import upload_service_pb2_grpc

from ingestion_grpc.api.http import HttpStatus, set_http_status
from ingestion_grpc.api.interceptors import current_principal
from ingestion_grpc.db.session import Database
from ingestion_grpc.domain import uploads
from ingestion_grpc.domain.uploads import (
    StoredUpload,
    UploadAbandoned,
    UploadStore,
    UploadTooLarge,
)
from ingestion_grpc.errors import ResourceExhausted

CONTENT_TOO_LARGE = 413
INSUFFICIENT_STORAGE = 507
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
# An upload holds one of the server's threads (server.py: 32) for as long as
# the client takes to send it, maybe hours; the rest stay free for the API.
MAX_CONCURRENT_UPLOADS = 8


class UploadServicer(upload_service_pb2_grpc.UploadServiceServicer):
    def __init__(
        self,
        database: Database,
        store: UploadStore,
        max_concurrent: int = MAX_CONCURRENT_UPLOADS,
    ) -> None:
        self._database = database
        self._store = store
        self._slots = threading.BoundedSemaphore(max_concurrent)

    def UploadFile(
        self, request_iterator: Iterator[httpbody_pb2.HttpBody], context: grpc.ServicerContext
    ) -> pb.UploadFileResponse:
        if not self._slots.acquire(blocking=False):
            # 429 Too Many Requests over REST.
            raise ResourceExhausted("Too many uploads are in progress; try again later.")
        try:
            stored = self._receive(request_iterator, context)
        finally:
            self._slots.release()
        self._record(stored)
        set_http_status(context, HttpStatus.CREATED)
        return pb.UploadFileResponse(file_path=stored.file_path)

    def _record(self, stored: StoredUpload) -> None:
        """The file becomes the caller's upload; without its row it is not kept."""
        try:
            with self._database.unit_of_work() as uow:
                uploads.record_upload(uow, current_principal(), stored)
                uow.commit()
        except BaseException:
            (self._store.root / stored.file_path).unlink(missing_ok=True)
            raise

    def _receive(
        self, request_iterator: Iterator[httpbody_pb2.HttpBody], context: grpc.ServicerContext
    ) -> StoredUpload:
        try:
            # A disconnected client ends the stream with grpc.RpcError; the
            # stream can also end early just before the cancellation is seen,
            # hence the last look at is_active() once the data is on disk.
            stored = self._store.store(
                (body.data for body in request_iterator), still_wanted=context.is_active
            )
        except UploadTooLarge as error:
            raise ResourceExhausted(str(error), CONTENT_TOO_LARGE) from None
        except (grpc.RpcError, UploadAbandoned):
            context.abort(grpc.StatusCode.CANCELLED, "The upload was cancelled.")
        except OSError as error:
            if error.errno not in _DISK_FULL:
                raise
            raise ResourceExhausted(
                "The server has no room left to store this upload; nothing was kept.",
                INSUFFICIENT_STORAGE,
            ) from None
        return stored
