"""Request size limits through Envoy: what Envoy forwards, the gRPC server takes;
what is too large gets 413 (body) or 431 (headers), never a 429 or a 5xx."""

from __future__ import annotations

import json

import pytest

from tests.support.rest import Rest

KIB = 1024
# envoy/envoy.yaml.in: max_request_headers_kb and the transcoder's max_request_body_size.
HEADERS_LIMIT = 32 * KIB
JSON_BODY_LIMIT = 512 * KIB


@pytest.mark.parametrize("size", [JSON_BODY_LIMIT + 1, 20 * KIB * KIB])
def test_a_json_body_past_the_limit_is_413(admin: Rest, size: int) -> None:
    before = admin.get("/v1/ingestion-sources").json()
    name = "x" * (size - len('{"name":""}'))
    response = admin.post(
        "/v1/ingestion-sources",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 413, response.text[:300]
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["code"] == 8
    assert admin.get("/v1/ingestion-sources").json() == before


@pytest.mark.parametrize(("size", "status"), [(100 * KIB, 400), (JSON_BODY_LIMIT, 413)])
def test_json_that_grows_when_transcoded_is_never_a_429(
    admin: Rest, size: int, status: int
) -> None:
    # A list of zeros grows most when transcoded (2 bytes of JSON, 11 of protobuf).
    # Small, it reaches the server, which answers about its content (400); near
    # the JSON limit, its protobuf passes Envoy's 1 MiB buffer (413). It never
    # reaches the server's 4 MiB message limit, which would answer 429.
    zeros = (size - 200) // 2
    body = {
        "name": "n",
        "provider": "generic_imap",
        "providerConfig": {"includeFolders": [0] * zeros},
    }
    encoded = json.dumps(body, separators=(",", ":")).encode()
    assert len(encoded) <= JSON_BODY_LIMIT
    response = admin.post(
        "/v1/ingestion-sources", data=encoded, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status, response.text[:300]


@pytest.mark.parametrize("size", [8 * KIB, 16 * KIB, 24 * KIB, HEADERS_LIMIT - 2 * KIB])
def test_headers_envoy_forwards_are_never_refused_by_the_server(admin: Rest, size: int) -> None:
    # gRPC's default limits refused such headers at random between 8 and 16 KiB.
    for _ in range(5):
        response = admin.get("/v1/ingestion-sources", headers={"Cookie": "c=" + "x" * size})
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("size", [HEADERS_LIMIT + KIB, 60 * KIB])
def test_headers_past_the_limit_are_431(admin: Rest, size: int) -> None:
    bearer = {"Authorization": "Bearer " + "x" * size}
    for headers in ({"Cookie": "c=" + "x" * size}, bearer):
        response = admin.get("/v1/ingestion-sources", headers=headers)
        assert response.status_code == 431, response.text
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["code"] == 8
