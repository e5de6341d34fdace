"""POST /v1/upload through Envoy, and UploadFile over native gRPC: the body is
streamed to UPLOAD_ROOT, kept only once whole, and refused past the limit."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import requests
from google.api import httpbody_pb2
from ingestion.v1 import upload_service_pb2_grpc

from ingestion_grpc.api.upload import MAX_CONCURRENT_UPLOADS
from ingestion_grpc.config import Settings, parse_size
from ingestion_grpc.domain import uploads
from ingestion_grpc.errors import ConfigurationError
from ingestion_grpc.server import RunningServer, start_server
from tests.support.envoy import EnvoyProxy, start_envoy
from tests.support.polling import wait_for
from tests.support.rest import Rest
from tests.support.services import ADMIN_EMAIL, ADMIN_PASSWORD

FILE_PATH = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.upload$")
MIB = 1024 * 1024
SMALL_LIMIT = "1M"


def pieces(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    """`data` in pieces: requests then sends it chunked, as it is produced."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def stored(root: Path, response: requests.Response) -> bytes:
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"filePath"}
    file_path: str = body["filePath"]
    assert FILE_PATH.match(file_path), body
    return (root / file_path).read_bytes()


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# -- through Envoy, on the session's server -----------------------------------------------


def test_upload_streams_the_body_to_disk_byte_for_byte(admin: Rest, settings: Settings) -> None:
    data = os.urandom(5 * MIB + 12345)
    response = admin.post(
        "/v1/upload", data=pieces(data), headers={"Content-Type": "application/mbox"}
    )
    assert response.headers["content-type"].startswith("application/json")
    assert "grpc-status" not in response.headers
    assert "x-http-code" not in response.headers
    assert stored(settings.upload_root, response) == data


def test_a_plain_body_with_content_length_and_an_empty_body(
    admin: Rest, settings: Settings
) -> None:
    data = b"From a@example.com Thu Jan  1 00:00:00 2004\r\nSubject: x\r\n\r\nhi\r\n"
    assert stored(settings.upload_root, admin.post("/v1/upload", data=data)) == data
    # An empty mbox is a valid (empty) import, so an empty upload is stored too.
    assert stored(settings.upload_root, admin.post("/v1/upload", data=b"")) == b""


def test_each_upload_gets_a_new_server_chosen_name(admin: Rest, settings: Settings) -> None:
    names = {admin.post("/v1/upload", data=b"same").json()["filePath"] for _ in range(3)}
    assert len(names) == 3
    # Nothing the client sends reaches the path: no file names are accepted at all.
    response = admin.post("/v1/upload?filename=../../etc/passwd", data=b"x")
    assert response.status_code == 400, response.text
    assert not any(p.name.endswith(".partial") for p in settings.upload_root.iterdir())


def test_upload_needs_create_ingestion(make_client: Callable[[str], Rest]) -> None:
    viewer = make_client("viewer")
    response = viewer.post("/v1/upload", data=pieces(os.urandom(256 * 1024)))
    assert response.status_code == 403, response.text
    assert response.json()["code"] == 7
    assert "create:ingestion" in response.json()["message"]
    user = make_client("user")
    assert user.post("/v1/upload", data=b"mine").status_code == 201


def test_upload_needs_credentials(rest_url: str) -> None:
    for headers in [{}, {"Authorization": "Bearer not-a-token"}, {"X-API-KEY": "ik_nope"}]:
        response = Rest(rest_url).post(
            "/v1/upload", data=pieces(os.urandom(256 * 1024)), headers=headers
        )
        assert response.status_code == 401, response.text
        assert response.json()["code"] == 16


def test_upload_with_an_api_key(admin: Rest, settings: Settings) -> None:
    created = admin.post("/v1/api-keys", json={"name": "uploader", "expiresInDays": 1})
    assert created.status_code == 201, created.text
    key = created.json()["key"]
    response = Rest(admin.base_url, api_key=key).post("/v1/upload", data=b"by key")
    assert stored(settings.upload_root, response) == b"by key"


# -- native gRPC, direct and through Envoy -------------------------------------------------


def bodies(data: bytes, size: int = MIB) -> Iterator[httpbody_pb2.HttpBody]:
    yield httpbody_pb2.HttpBody(content_type="application/vnd.ms-outlook", data=data[:size])
    for start in range(size, len(data), size):
        yield httpbody_pb2.HttpBody(data=data[start : start + size])


def test_native_grpc_client_streaming(
    grpc_channel: grpc.Channel, admin: Rest, settings: Settings
) -> None:
    stub = upload_service_pb2_grpc.UploadServiceStub(grpc_channel)
    metadata = (("authorization", f"Bearer {admin.token}"),)
    data = os.urandom(3 * MIB + 7)
    # Pieces of the full 4 MiB gRPC clients may send, then small ones.
    big = os.urandom(4 * MIB) + data
    for payload, size in [(data, 256 * 1024), (big, 4 * MIB)]:
        response, call = stub.UploadFile.with_call(bodies(payload, size), metadata=metadata)
        assert FILE_PATH.match(response.file_path)
        assert (settings.upload_root / response.file_path).read_bytes() == payload
        # The REST status travels as metadata; gRPC clients may ignore it.
        assert ("x-http-code", "201") in call.initial_metadata()


def test_native_grpc_refusals(
    grpc_channel: grpc.Channel, make_client: Callable[[str], Rest]
) -> None:
    stub = upload_service_pb2_grpc.UploadServiceStub(grpc_channel)
    with pytest.raises(grpc.RpcError) as raised:
        stub.UploadFile(bodies(b"x" * 1000))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    viewer = make_client("viewer")
    with pytest.raises(grpc.RpcError) as raised:
        stub.UploadFile(
            bodies(b"x" * 1000), metadata=(("authorization", f"Bearer {viewer.token}"),)
        )
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


# -- a server of our own with a small MAX_UPLOAD_BYTES ----------------------------------


@dataclass
class SmallServer:
    server: RunningServer
    envoy: EnvoyProxy
    upload_root: Path
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture(scope="module")
def small(
    environment: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SmallServer]:
    upload_root = tmp_path_factory.mktemp("small-uploads")
    settings = Settings.from_env(
        {**environment, "UPLOAD_ROOT": str(upload_root), "MAX_UPLOAD_BYTES": SMALL_LIMIT}
    )
    assert settings.max_upload_bytes == MIB
    server = start_server(settings, port=0)
    envoy = start_envoy(server.port, tmp_path_factory.mktemp("small-envoy"))
    try:
        envoy.wait_healthy()
        token = Rest(envoy.base_url).login(ADMIN_EMAIL, ADMIN_PASSWORD).token
        assert token is not None
        yield SmallServer(server, envoy, upload_root, token)
    finally:
        envoy.stop()
        server.stop(grace=1)


def test_up_to_the_limit_is_fine(small: SmallServer) -> None:
    data = os.urandom(MIB)
    response = requests.post(
        f"{small.envoy.base_url}/v1/upload", data=pieces(data), headers=small.auth, timeout=30
    )
    assert stored(small.upload_root, response) == data
    (small.upload_root / response.json()["filePath"]).unlink()


@pytest.mark.parametrize("size", [MIB + 1, 20 * MIB])
def test_past_the_limit_is_413_and_leaves_nothing(small: SmallServer, size: int) -> None:
    response = requests.post(
        f"{small.envoy.base_url}/v1/upload",
        data=pieces(os.urandom(size)),
        headers=small.auth,
        timeout=30,
    )
    assert response.status_code == 413, response.text
    body = response.json()
    assert body["code"] == 8  # RESOURCE_EXHAUSTED
    assert str(MIB) in body["message"]
    assert "x-http-code" not in response.headers
    wait_for(lambda: leftovers(small.upload_root), lambda left: left == [], 10, "cleanup")


def test_a_full_disk_is_507_and_leaves_nothing(
    small: SmallServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes to /dev/full fail as on a full disk (ENOSPC)."""
    real_open = open

    def full_disk(path: Path, mode: str) -> object:
        real_open(path, mode).close()  # the partial file exists, as it would
        return real_open("/dev/full", "wb")

    monkeypatch.setattr(uploads, "open", full_disk, raising=False)
    response = requests.post(
        f"{small.envoy.base_url}/v1/upload",
        data=pieces(os.urandom(MIB // 2)),
        headers=small.auth,
        timeout=30,
    )
    assert response.status_code == 507, response.text
    assert response.json() == {
        "code": 8,
        "message": "The server has no room left to store this upload; nothing was kept.",
        "details": [],
    }
    wait_for(lambda: leftovers(small.upload_root), lambda left: left == [], 10, "cleanup")


def test_past_the_limit_over_native_grpc(small: SmallServer) -> None:
    for target in (f"127.0.0.1:{small.server.port}", small.envoy.grpc_target):
        with grpc.insecure_channel(target) as channel:
            stub = upload_service_pb2_grpc.UploadServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.UploadFile(
                    bodies(os.urandom(3 * MIB), 256 * 1024),
                    metadata=(("authorization", f"Bearer {small.token}"),),
                )
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert leftovers(small.upload_root) == []


def _partial_appears(root: Path) -> None:
    wait_for(
        lambda: leftovers(root),
        lambda left: any(name.endswith(".partial") for name in left),
        10,
        "the upload to start",
    )


def test_a_rest_client_that_disconnects_leaves_nothing(small: SmallServer) -> None:
    host, port = small.envoy.grpc_target.split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            (
                "POST /v1/upload HTTP/1.1\r\n"
                f"Host: {small.envoy.grpc_target}\r\n"
                f"Authorization: Bearer {small.token}\r\n"
                "Content-Type: application/octet-stream\r\n"
                f"Content-Length: {MIB}\r\n\r\n"
            ).encode()
            + os.urandom(300 * 1024)
        )
        _partial_appears(small.upload_root)
    wait_for(lambda: leftovers(small.upload_root), lambda left: left == [], 10, "cleanup")


def test_a_grpc_client_that_cancels_leaves_nothing(small: SmallServer) -> None:
    release = threading.Event()

    def stalled() -> Iterator[httpbody_pb2.HttpBody]:
        yield httpbody_pb2.HttpBody(content_type="application/mbox", data=os.urandom(300 * 1024))
        release.wait(30)

    with grpc.insecure_channel(small.envoy.grpc_target) as channel:
        stub = upload_service_pb2_grpc.UploadServiceStub(channel)
        future = stub.UploadFile.future(
            stalled(), metadata=(("authorization", f"Bearer {small.token}"),)
        )
        _partial_appears(small.upload_root)
        future.cancel()
        release.set()
        with pytest.raises(grpc.FutureCancelledError):
            future.result()
    wait_for(lambda: leftovers(small.upload_root), lambda left: left == [], 10, "cleanup")


def test_too_many_uploads_at_once_are_refused_with_429(small: SmallServer) -> None:
    release = threading.Event()

    def stalled() -> Iterator[httpbody_pb2.HttpBody]:
        yield httpbody_pb2.HttpBody(data=b"x" * 1024)
        release.wait(30)

    metadata = (("authorization", f"Bearer {small.token}"),)
    with grpc.insecure_channel(small.envoy.grpc_target) as channel:
        stub = upload_service_pb2_grpc.UploadServiceStub(channel)
        running = [
            stub.UploadFile.future(stalled(), metadata=metadata)
            for _ in range(MAX_CONCURRENT_UPLOADS)
        ]
        wait_for(
            lambda: leftovers(small.upload_root),
            lambda left: len(left) == MAX_CONCURRENT_UPLOADS,
            10,
            "every upload to start",
        )
        response = requests.post(
            f"{small.envoy.base_url}/v1/upload", data=b"one more", headers=small.auth, timeout=30
        )
        assert response.status_code == 429, response.text
        assert response.json()["code"] == 8
        release.set()  # the stalled uploads end normally and free their slots
        for future in running:
            future.result(timeout=30)
    again = requests.post(
        f"{small.envoy.base_url}/v1/upload", data=b"now", headers=small.auth, timeout=30
    )
    assert stored(small.upload_root, again) == b"now"
    for path in small.upload_root.iterdir():
        path.unlink()


@pytest.mark.parametrize(
    ("text", "size"),
    [("1048576", MIB), ("1M", MIB), ("500m", 500 * MIB), ("10G", 10 << 30), ("2GiB", 2 << 30)],
)
def test_max_upload_bytes_accepts_bytes_and_suffixes(text: str, size: int) -> None:
    assert parse_size(text, "MAX_UPLOAD_BYTES") == size


@pytest.mark.parametrize("text", ["", "0", "-5", "1.5G", "10X", "G"])
def test_max_upload_bytes_rejects_nonsense(text: str) -> None:
    with pytest.raises(ConfigurationError, match="MAX_UPLOAD_BYTES"):
        parse_size(text, "MAX_UPLOAD_BYTES")


def test_the_stored_file_hash_matches_for_a_larger_upload(admin: Rest, settings: Settings) -> None:
    digest = hashlib.sha256()

    def generated() -> Iterator[bytes]:
        block = os.urandom(MIB)
        for index in range(32):
            piece = index.to_bytes(8, "big") + block[8:]
            digest.update(piece)
            yield piece

    response = admin.post("/v1/upload", data=generated())
    assert response.status_code == 201, response.text
    path = settings.upload_root / response.json()["filePath"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest.hexdigest()
    path.unlink()
