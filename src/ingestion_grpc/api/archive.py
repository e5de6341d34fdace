"""ArchiveService: archived messages' metadata and their exact bytes."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from google.api import httpbody_pb2
from ingestion.v1 import archive_service_pb2 as pb
from ingestion.v1 import archive_service_pb2_grpc, resources_pb2

from ingestion_grpc.api.interceptors import current_principal
from ingestion_grpc.api.mapping import archived_email_to_proto
from ingestion_grpc.archive.blobstore import BlobStore
from ingestion_grpc.db.session import Database
from ingestion_grpc.domain import archive

RFC822 = "message/rfc822"


class ArchiveServicer(archive_service_pb2_grpc.ArchiveServiceServicer):
    def __init__(self, database: Database, blobs: BlobStore) -> None:
        self._database = database
        self._blobs = blobs

    def ListArchivedEmails(
        self, request: pb.ListArchivedEmailsRequest, context: grpc.ServicerContext
    ) -> pb.ListArchivedEmailsResponse:
        with self._database.unit_of_work() as uow:
            page = archive.list_archived(
                uow, current_principal(), request.source_id, request.page_size, request.page_token
            )
            return pb.ListArchivedEmailsResponse(
                archived_emails=[archived_email_to_proto(e) for e in page.emails],
                next_page_token=page.next_page_token,
                total_size=page.total_size,
            )

    def GetArchivedEmail(
        self, request: pb.GetArchivedEmailRequest, context: grpc.ServicerContext
    ) -> resources_pb2.ArchivedEmail:
        with self._database.unit_of_work() as uow:
            return archived_email_to_proto(
                archive.get_archived(uow, current_principal(), request.id)
            )

    def GetArchivedEmailRaw(
        self, request: pb.GetArchivedEmailRawRequest, context: grpc.ServicerContext
    ) -> Iterator[httpbody_pb2.HttpBody]:
        with self._database.unit_of_work() as uow:
            email = archive.get_for_download(uow, current_principal(), request.id)
            uow.commit()
        # An empty message still needs one chunk to carry the content type.
        chunks = archive.read_raw(self._blobs, email)
        first = next(chunks, b"")
        yield httpbody_pb2.HttpBody(content_type=RFC822, data=first)
        for chunk in chunks:
            yield httpbody_pb2.HttpBody(data=chunk)
