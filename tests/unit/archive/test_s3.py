"""What only the S3 backend promises, against a real S3-protocol server
(moto_server): its key layout, the SHA-256 sent with every PUT, one request for a
new blob and no rewrite of one already stored, and outages as `Unavailable`,
never as a missing blob.
(The conformance suite in test_blobstore.py runs against it too.)"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from ingestion_grpc.archive.blobstore import BlobNotFound, blob_store_from_settings, sha256_hex
from ingestion_grpc.archive.s3 import BlobStoreUnavailable, S3BlobStore, s3_client
from ingestion_grpc.config import Settings
from ingestion_grpc.errors import Unavailable
from tests.support.envoy import free_port
from tests.support.s3 import CREDENTIALS, S3Archive, credentials_in_environment

REQUIRED_SETTINGS = {
    "DATABASE_URL": "postgresql://db",
    "REDIS_URL": "redis://r",
    "JWT_SECRET": "s" * 32,
    "ENCRYPTION_KEY": "ab" * 32,
}


@pytest.fixture
def store(s3_archive: S3Archive) -> Iterator[S3BlobStore]:
    store = s3_archive.store()
    yield store
    store.close()


@pytest.fixture
def puts(s3_archive: S3Archive) -> Iterator[list[dict[str, Any]]]:
    """The parameters of every PutObject the test's stores send (botocore's own
    event hook on the client they use; removed after the test)."""
    sent: list[dict[str, Any]] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        sent.append(dict(params))

    events = s3_archive.client.meta.events
    events.register("provide-client-params.s3.PutObject", record)
    yield sent
    events.unregister("provide-client-params.s3.PutObject", record)


@pytest.fixture
def requests_sent(s3_archive: S3Archive) -> Iterator[list[tuple[str, str, str | None]]]:
    """(method, object key, If-None-Match) of every HTTP request the test's stores
    send, retries included (botocore's before-send hook; removed after the test)."""
    sent: list[tuple[str, str, str | None]] = []
    prefix = f"/{s3_archive.bucket}/"

    def record(request: Any, **_: Any) -> None:
        path = unquote(urlsplit(request.url).path)
        key = path[len(prefix) :] if path.startswith(prefix) else path
        condition = request.headers.get("If-None-Match")
        sent.append((request.method, key, None if condition is None else condition.decode()))

    events = s3_archive.client.meta.events
    events.register("before-send.s3", record)
    yield sent
    events.unregister("before-send.s3", record)


def test_keys_are_prefix_folder_digest(s3_archive: S3Archive, store: S3BlobStore) -> None:
    digest = store.put(b"layout")
    listed = s3_archive.client.list_objects_v2(Bucket=s3_archive.bucket)["Contents"]
    assert [item["Key"] for item in listed] == [f"archive/{digest[:2]}/{digest}"]
    assert store.key(digest) == f"archive/{digest[:2]}/{digest}"
    assert S3BlobStore("b-b", "", client=s3_archive.client).key(digest) == f"{digest[:2]}/{digest}"


def test_every_put_sends_the_sha256_and_the_store_keeps_it(
    s3_archive: S3Archive, store: S3BlobStore, puts: list[dict[str, Any]]
) -> None:
    data = b"From: a@example.com\r\n\r\nchecked\r\n"
    digest = store.put(data)
    expected = base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert [(p["Key"], p["ChecksumSHA256"], p["ChecksumAlgorithm"]) for p in puts] == [
        (store.key(digest), expected, "SHA256")
    ]
    head = s3_archive.client.head_object(
        Bucket=s3_archive.bucket, Key=store.key(digest), ChecksumMode="ENABLED"
    )
    assert head["ChecksumSHA256"] == expected
    assert head["ContentLength"] == len(data)


def test_a_new_blob_costs_one_request(
    store: S3BlobStore, requests_sent: list[tuple[str, str, str | None]]
) -> None:
    blobs = [f"new message {i}".encode() for i in range(10)]
    store.put(blobs[0])
    store.put_many(blobs[1:])
    assert sorted(requests_sent) == sorted(
        ("PUT", store.key(sha256_hex(data)), "*") for data in blobs
    )
    assert [store.read(sha256_hex(data)) for data in blobs] == blobs


def test_a_stored_blob_is_not_written_again(
    s3_archive: S3Archive, store: S3BlobStore, requests_sent: list[tuple[str, str, str | None]]
) -> None:
    blobs = [f"message {i}".encode() for i in range(20)]
    stored = [store.key(sha256_hex(data)) for data in blobs[:10]]
    new = [store.key(sha256_hex(data)) for data in blobs[10:]]
    for key, data in zip(stored, blobs, strict=False):
        # Stored before, with a mark that a rewrite would not keep.
        s3_archive.client.put_object(
            Bucket=s3_archive.bucket, Key=key, Body=data, Metadata={"stored": "before"}
        )
    requests_sent.clear()
    assert store.put_many(blobs) == [sha256_hex(data) for data in blobs]
    # A refused conditional PUT and a HEAD for each stored one; one PUT for each new one.
    assert sorted(requests_sent) == sorted(
        [("PUT", key, "*") for key in stored + new] + [("HEAD", key, None) for key in stored]
    )
    for key in stored:
        head = s3_archive.client.head_object(Bucket=s3_archive.bucket, Key=key)
        assert head["Metadata"] == {"stored": "before"}
    assert [store.read(sha256_hex(data)) for data in blobs] == blobs


def test_a_damaged_object_is_rewritten(
    s3_archive: S3Archive, store: S3BlobStore, requests_sent: list[tuple[str, str, str | None]]
) -> None:
    data = b"whole message"
    digest = sha256_hex(data)
    key = store.key(digest)
    s3_archive.client.put_object(Bucket=s3_archive.bucket, Key=key, Body=b"whole")
    requests_sent.clear()
    assert store.put(data) == digest
    assert requests_sent == [("PUT", key, "*"), ("HEAD", key, None), ("PUT", key, None)]
    assert store.read(digest) == data


def test_listing_ignores_other_keys(s3_archive: S3Archive, store: S3BlobStore) -> None:
    digest = store.put(b"mine")
    other = sha256_hex(b"other")
    for key in (
        f"other-prefix/{other[:2]}/{other}",  # another archive in the same bucket
        f"archive/zz/{other}",  # not where a blob goes
        "archive/README",
    ):
        s3_archive.client.put_object(Bucket=s3_archive.bucket, Key=key, Body=b"other")
    assert [name for name, _ in store.listing()] == [digest]


def test_a_missing_bucket_is_an_outage_not_a_missing_blob(s3_archive: S3Archive) -> None:
    store = S3BlobStore("no-such-bucket-here", "archive", client=s3_archive.client)
    with pytest.raises(BlobStoreUnavailable, match="no-such-bucket-here") as raised:
        store.put(b"nowhere to go")
    assert not isinstance(raised.value, BlobNotFound)
    with pytest.raises(BlobStoreUnavailable):
        store.open(sha256_hex(b"x"))
    with pytest.raises(BlobStoreUnavailable):
        list(store.listing())


def test_an_unreachable_store_is_unavailable_and_names_no_credential() -> None:
    with credentials_in_environment():
        client = s3_client(f"http://127.0.0.1:{free_port()}", max_attempts=1)
    store = S3BlobStore("archive", "", client=client)
    for call in (lambda: store.put(b"x"), lambda: store.read(sha256_hex(b"x"))):
        with pytest.raises(Unavailable) as raised:
            call()
        for secret in CREDENTIALS.values():
            assert secret not in str(raised.value)


def test_blob_store_from_settings_chooses_s3(s3_archive: S3Archive) -> None:
    with credentials_in_environment():
        store = blob_store_from_settings(
            Settings.from_env({**REQUIRED_SETTINGS, **s3_archive.environment})
        )
    assert isinstance(store, S3BlobStore)
    assert (store.bucket, store.prefix) == (s3_archive.bucket, "archive")
    digest = store.put(b"configured")
    assert s3_archive.store().read(digest) == b"configured"


def test_a_body_that_does_not_match_its_stored_sha256_is_refused_on_read(
    s3_archive: S3Archive, store: S3BlobStore
) -> None:
    """moto keeps whatever checksum a PUT claims (S3 would refuse the PUT): the
    read notices, and fails like an outage rather than serving the wrong bytes."""
    digest = sha256_hex(b"the real message")
    s3_archive.client.put_object(
        Bucket=s3_archive.bucket,
        Key=store.key(digest),
        Body=b"other bytes here",
        ChecksumAlgorithm="SHA256",
        ChecksumSHA256=base64.b64encode(bytes.fromhex(digest)).decode(),
    )
    with pytest.raises(BlobStoreUnavailable, match="checksum"):
        store.read(digest)
    with store.open(digest) as blob, pytest.raises(BlobStoreUnavailable, match="checksum"):
        while blob.read(4):
            pass
