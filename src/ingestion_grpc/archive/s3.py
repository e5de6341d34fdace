"""Blobs as objects in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, R2, ...).

The same promises as `LocalBlobStore`: a blob's name is its SHA-256, and when
`put_many` returns, the store has acknowledged every PUT after checking the
SHA-256 we sent with it (`x-amz-checksum-sha256`: S3 refuses a body that does not
match), and the stored object has the blob's size. Keys are
`<prefix>/<ab>/<sha256>`, like the local layout.

Credentials come from boto3's standard chain (environment variables, the shared
config and credentials files, container or instance roles); this module never
sees them, so it cannot log them.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ingestion_grpc.archive.blobstore import (
    BlobNotFound,
    BlobStore,
    ConcurrentCalls,
    check_digest,
    is_digest,
    sha256_hex,
)
from ingestion_grpc.errors import Unavailable
from ingestion_grpc.telemetry.metrics import BLOB_WRITE_SECONDS

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer
    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import PutObjectOutputTypeDef, PutObjectRequestTypeDef

log = logging.getLogger(__name__)

# PUTs in flight at once from one store. Each is a round trip to the object store
# (milliseconds, mostly waiting), so overlap is what makes a batch fast; the
# connection pool is as large, so no request waits for a connection.
PUT_CONCURRENCY = 16

# How a store says "no such object" (a HEAD's 404 has no body, hence "404").
# NoSuchBucket is not among them: a missing bucket is an outage, not a missing blob.
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
# How a store refuses a conditional PUT: the object exists (412), or another
# conditional write of the same key is under way (409, S3's own).
_CONDITION_REFUSED_CODES = frozenset(
    {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
)


class BlobStoreUnavailable(Unavailable):
    """Raised when the object store cannot be reached or refuses a request."""


class BlobWriteMismatch(BlobStoreUnavailable):
    """Raised when the store's answer to a PUT does not match the bytes sent."""


class _ConditionRefused(Exception):
    """Raised when a conditional PUT was refused: the object is there already."""


def s3_client(endpoint_url: str | None = None, *, max_attempts: int = 5) -> S3Client:
    """An S3 client with credentials and region from boto3's standard chain.

    Retries use botocore's "standard" mode: it retries throttling (503 SlowDown),
    5xx answers and dropped connections with exponential backoff and jitter (up
    to `max_attempts` tries), which is what a transient outage of the store needs; the
    legacy default retries fewer error kinds and backs off without jitter.
    """
    config = Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        max_pool_connections=PUT_CONCURRENCY,
        # The checksum is computed by us (it is the blob's name) and sent
        # explicitly; reads are validated against the stored SHA-256 when the
        # store keeps one.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_supported",
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)


class S3BlobStore(BlobStore):
    """Blobs as objects `<prefix>/<ab>/<sha256>` in `bucket`."""

    def __init__(self, bucket: str, prefix: str = "", *, client: S3Client) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = client
        self._putters = ConcurrentCalls(PUT_CONCURRENCY, "s3-put", inline_up_to=1)

    def key(self, sha256: str) -> str:
        """The object key of a blob."""
        check_digest(sha256)
        return self._key(sha256)

    def put(self, data: bytes) -> str:
        return self.put_many([data])[0]

    def put_many(self, blobs: list[bytes]) -> list[str]:
        """Store a batch: the blobs not stored yet are PUT, several at a time."""
        with BLOB_WRITE_SECONDS.labels("s3").time():
            names = [sha256_hex(data) for data in blobs]
            unique = dict(zip(names, blobs, strict=True))
            self._putters.run_all(self._store, unique.items())
            return names

    def open(self, sha256: str) -> BinaryIO:
        """A stream over the object's body: the bytes arrive as the caller reads."""
        key = self.key(sha256)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as error:
            raise self._translated(error, sha256) from None
        except BotoCoreError as error:
            raise self._unreachable(error) from None
        return cast(BinaryIO, _ObjectBody(response["Body"], f"blob {sha256}"))

    def exists(self, sha256: str) -> bool:
        return self._stored_size(self.key(sha256)) is not None

    def size(self, sha256: str) -> int:
        found = self._stored_size(self.key(sha256))
        if found is None:
            raise BlobNotFound(f"blob {sha256} is not stored")
        return found

    def delete(self, sha256: str) -> None:
        key = self.key(sha256)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except ClientError as error:
            raise self._translated(error, sha256) from None
        except BotoCoreError as error:
            raise self._unreachable(error) from None

    def listing(self) -> Iterator[tuple[str, datetime]]:
        start = f"{self.prefix}/" if self.prefix else ""
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=start
        )
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    name = item["Key"][len(start) :]
                    folder, _, digest = name.partition("/")
                    if is_digest(digest) and folder == digest[:2]:
                        yield digest, item["LastModified"].astimezone(UTC)
        except ClientError as error:
            raise BlobStoreUnavailable(
                f"object store bucket {self.bucket}: {_code(error)} listing blobs"
            ) from None
        except BotoCoreError as error:
            raise self._unreachable(error) from None

    def close(self) -> None:
        """Stop the PUT threads (a store is otherwise used for the process's life)."""
        self._putters.close()

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name[:2]}/{name}" if self.prefix else f"{name[:2]}/{name}"

    def _store(self, item: tuple[str, bytes]) -> None:
        """PUT one blob unless the bucket holds it whole; check what the store says.

        One request for a new blob: the PUT is conditional (`If-None-Match: *`), so
        a blob the bucket holds already is not written again. A store that ignores
        the condition overwrites the object with the same bytes (its name is their
        SHA-256), which is harmless.
        """
        name, data = item
        key = self._key(name)
        checksum = base64.b64encode(binascii.unhexlify(name)).decode("ascii")
        try:
            response = self._put(name, key, data, checksum, only_if_absent=True)
        except _ConditionRefused:
            # Stored already (412), or another worker is writing it now (409):
            # keep what is there if it is whole.
            found = self._stored_size(key)
            if found == len(data):
                return
            if found is not None:
                log.warning(
                    "blob %s has %d bytes in the bucket, expected %d: rewriting it",
                    name,
                    found,
                    len(data),
                )
            response = self._put(name, key, data, checksum)
        echoed = response.get("ChecksumSHA256")
        if echoed == checksum:
            # The store computed the SHA-256 of the body it received and kept it
            # with the object: the object is these bytes, so their size too.
            return
        if echoed is not None:
            raise BlobWriteMismatch(f"the object store stored blob {name} with another SHA-256")
        # A store that ignores checksums (older MinIO, Ceph): check the size it holds.
        stored = self._stored_size(key)
        if stored != len(data):
            raise BlobWriteMismatch(
                f"the object store holds {stored} bytes of blob {name}, expected {len(data)}"
            )

    def _put(
        self, name: str, key: str, data: bytes, checksum: str, *, only_if_absent: bool = False
    ) -> PutObjectOutputTypeDef:
        """PutObject with the blob's SHA-256; `_ConditionRefused` when `only_if_absent`
        and the store says the object exists."""
        request: PutObjectRequestTypeDef = {
            "Bucket": self.bucket,
            "Key": key,
            "Body": data,
            "ContentLength": len(data),
            "ChecksumAlgorithm": "SHA256",
            "ChecksumSHA256": checksum,
        }
        if only_if_absent:
            request["IfNoneMatch"] = "*"
        try:
            return self._client.put_object(**request)
        except ClientError as error:
            if only_if_absent and _code(error) in _CONDITION_REFUSED_CODES:
                raise _ConditionRefused from None
            raise BlobStoreUnavailable(
                f"object store bucket {self.bucket}: {_code(error)} storing blob {name}"
            ) from None
        except BotoCoreError as error:
            raise self._unreachable(error) from None

    def _stored_size(self, key: str) -> int | None:
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as error:
            if _is_not_found(error):
                return None
            raise self._translated(error, key.rpartition("/")[2]) from None
        except BotoCoreError as error:
            raise self._unreachable(error) from None
        return head["ContentLength"]

    def _translated(self, error: ClientError, name: str) -> Exception:
        if _is_not_found(error):
            return BlobNotFound(f"blob {name} is not stored")
        return BlobStoreUnavailable(f"object store bucket {self.bucket}: {_code(error)}")

    def _unreachable(self, error: BotoCoreError) -> Exception:
        # botocore's messages name the endpoint and the problem, never a secret.
        return BlobStoreUnavailable(f"object store bucket {self.bucket}: {error}")


class _ObjectBody(io.RawIOBase):
    """An object's body as a binary file that reads through botocore's stream.

    botocore's StreamingBody checks the length and the stored SHA-256 as it is
    read, but its context manager hands out the raw urllib3 stream, which checks
    neither; this one reads through it whatever way it is used. A failure while
    reading (a dropped connection, a body that does not match its SHA-256) is
    BlobStoreUnavailable, never a short or wrong message.
    """

    def __init__(self, body: StreamingBody, what: str) -> None:
        super().__init__()
        self._body = body
        self._what = what

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        try:
            return self._body.read(None if size is None or size < 0 else size)
        except BotoCoreError as error:
            raise BlobStoreUnavailable(f"reading {self._what}: {error}") from None

    def readall(self) -> bytes:
        return self.read()

    def readinto(self, buffer: WriteableBuffer) -> int:
        target = memoryview(buffer).cast("B")
        data = self.read(len(target))
        target[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()
        super().close()


def _is_not_found(error: ClientError) -> bool:
    return _code(error) in _NOT_FOUND_CODES


def _code(error: ClientError) -> str:
    response: Any = error.response
    return str(response.get("Error", {}).get("Code", "unknown"))
