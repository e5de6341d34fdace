"""Bad input through Envoy: always a JSON error naming what is wrong, never a 5xx."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.support.rest import Rest

# A key whose shape is right: the requests below fail on other fields first.
SERVICE_ACCOUNT_KEY = json.dumps(
    {
        "type": "service_account",
        "client_email": "archiver@example-project.iam.gserviceaccount.com",
        "private_key": (
            "-----BEGIN PRIVATE KEY-----\nTOP-SECRET-KEY-MATERIAL\n-----END PRIVATE KEY-----\n"
        ),
        "token_uri": "https://oauth2.googleapis.com/token",
    }
)
GOOGLE_CONFIG = {
    "serviceAccountKeyJson": SERVICE_ACCOUNT_KEY,
    "impersonatedAdminEmail": "admin@corp.example.com",
}


@pytest.fixture
def user(make_client: Callable[[str], Rest]) -> Rest:
    return make_client("user")


def field_of(response_json: dict) -> str:
    return response_json["details"][0]["fieldViolations"][0]["field"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"provider": "google_workspace", "providerConfig": GOOGLE_CONFIG}, "name"),
        ({"name": " ", "provider": "google_workspace", "providerConfig": GOOGLE_CONFIG}, "name"),
        (
            {"name": "x" * 201, "provider": "google_workspace", "providerConfig": GOOGLE_CONFIG},
            "name",
        ),
        ({"name": "n", "providerConfig": GOOGLE_CONFIG}, "provider"),
        ({"name": "n", "provider": "exchange_2003", "providerConfig": {}}, "provider"),
        ({"name": "n", "provider": "google_workspace"}, "providerConfig"),
        (
            {
                "name": "n",
                "provider": "google_workspace",
                "providerConfig": {"impersonatedAdminEmail": "a@b.example"},
            },
            "providerConfig.serviceAccountKeyJson",
        ),
        (
            {
                "name": "n",
                "provider": "google_workspace",
                "providerConfig": {**GOOGLE_CONFIG, "colour": "blue"},
            },
            "providerConfig.colour",
        ),
        (
            {
                "name": "n",
                "provider": "generic_imap",
                "providerConfig": {
                    "host": "h",
                    "port": "993",
                    "secure": True,
                    "username": "u",
                    "password": "p",
                },
            },
            "providerConfig.port",
        ),
        (
            {
                "name": "n",
                "provider": "generic_imap",
                "providerConfig": {
                    "host": "h",
                    "port": 993,
                    "secure": "yes",
                    "username": "u",
                    "password": "p",
                },
            },
            "providerConfig.secure",
        ),
        (
            {"name": "n", "provider": "mbox_import", "providerConfig": {}},
            "providerConfig.localFilePath",
        ),
    ],
)
def test_create_with_a_bad_field_is_400_naming_it(user: Rest, body: dict, field: str) -> None:
    before = len(user.get("/v1/ingestion-sources").json())
    response = user.post("/v1/ingestion-sources", json=body)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["code"] == 3
    assert field_of(response.json()) == field
    assert field in response.json()["message"]
    assert len(user.get("/v1/ingestion-sources").json()) == before


def test_malformed_json_is_a_json_400(user: Rest) -> None:
    response = user.post(
        "/v1/ingestion-sources",
        data=b'{"name": "x", ',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["message"]


def test_unknown_path_is_a_json_404(user: Rest) -> None:
    response = user.get("/v1/no-such-thing")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["message"]


def test_unknown_query_parameter_is_a_json_400(user: Rest) -> None:
    response = user.get("/v1/ingestion-sources?colour=blue")
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["message"]


def test_wrong_json_type_is_a_json_400(user: Rest) -> None:
    response = user.post(
        "/v1/ingestion-sources", json={"name": 5, "provider": [], "providerConfig": 3}
    )
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
