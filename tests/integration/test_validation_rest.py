"""Bad input through Envoy: always a JSON error naming what is wrong, never a 5xx."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator

import pytest
import requests

from tests.support.fake_tenant import tenant_config
from tests.support.rest import Rest
from tests.support.sources import create_source, runs

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


# --- every string of every request: UTF-8, no control characters, bounded ----------

# Every REST operation that takes an id in its path, with the id's JSON name.
PATH_IDS = [
    ("GET", "/v1/ingestion-sources/{x}", "id"),
    ("PUT", "/v1/ingestion-sources/{x}", "id"),
    ("DELETE", "/v1/ingestion-sources/{x}", "id"),
    ("POST", "/v1/ingestion-sources/{x}/import", "id"),
    ("POST", "/v1/ingestion-sources/{x}/pause", "id"),
    ("POST", "/v1/ingestion-sources/{x}/sync", "id"),
    ("GET", "/v1/ingestion-sources/{x}/sync-sessions", "id"),
    ("GET", "/v1/ingestion-sources/{x}/sync-sessions/s/mailboxes", "id"),
    ("GET", "/v1/ingestion-sources/{s}/sync-sessions/{x}/mailboxes", "sessionId"),
    ("GET", "/v1/ingestion-sources/{x}/archived-emails", "sourceId"),
    ("GET", "/v1/archived-emails/{x}", "id"),
    ("GET", "/v1/archived-emails/{x}/raw", "id"),
    ("DELETE", "/v1/api-keys/{x}", "id"),
]
# Percent-encoded, as a client would put them in a URL.
BAD_PATH_TEXT = {
    "nul": "a%00b",
    "line break": "a%0Ab",
    "escape": "a%1Bb",
    "invalid utf-8": "%FF%FE",
    "lone continuation byte": "a%80",
    "too long": "x" * 257,
}
LISTS_WITH_TOKENS = [
    "/v1/ingestion-sources/{s}/sync-sessions",
    "/v1/ingestion-sources/{s}/sync-sessions/{r}/mailboxes",
    "/v1/ingestion-sources/{s}/archived-emails",
]


def assert_names(response: requests.Response, field: str) -> None:
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["code"] == 3
    assert field_of(body) == field
    assert body["message"].startswith(f"{field}: ")


@pytest.fixture(scope="module")
def source(admin: Rest) -> dict:
    """A source of the admin's, with its first run."""
    created = create_source(admin, "validation", "fake_tenant", tenant_config())
    created["runId"] = runs(admin, created["id"])[0]["id"]
    return created


@pytest.mark.parametrize("bad", ["a%00b", "%FF%FE"], ids=["nul", "invalid utf-8"])
@pytest.mark.parametrize(
    ("method", "path", "field"), PATH_IDS, ids=[f"{m} {p}" for m, p, _ in PATH_IDS]
)
def test_a_bad_path_id_is_400_naming_it(
    admin: Rest, source: dict, method: str, path: str, field: str, bad: str
) -> None:
    body = {} if method in ("PUT", "POST") else None
    response = admin.request(method, path.format(x=bad, s=source["id"]), json=body)
    assert_names(response, field)
    assert bad not in response.text


@pytest.mark.parametrize("bad", BAD_PATH_TEXT.values(), ids=BAD_PATH_TEXT.keys())
def test_every_kind_of_bad_path_text_is_400(admin: Rest, bad: str) -> None:
    assert_names(admin.get(f"/v1/archived-emails/{bad}"), "id")


@pytest.mark.parametrize("bad", BAD_PATH_TEXT.values(), ids=BAD_PATH_TEXT.keys())
def test_a_bad_page_token_is_400_naming_it(admin: Rest, source: dict, bad: str) -> None:
    url = f"/v1/ingestion-sources/{source['id']}/archived-emails"
    assert_names(admin.get(f"{url}?pageToken={bad}"), "pageToken")


def token_of(*parts: str) -> str:
    raw = json.dumps(list(parts)).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        token_of("2024-01-01T00:00:00+00:00", "a\x00b"),
        token_of("a\x00b", "id"),
        # A lone surrogate: valid JSON, but no text PostgreSQL can store.
        base64.urlsafe_b64encode(b'["2024-01-01T00:00:00+00:00", "\\ud800"]').decode(),
    ],
    ids=["nul in the id", "nul in the key", "lone surrogate"],
)
@pytest.mark.parametrize("path", LISTS_WITH_TOKENS, ids=["runs", "mailboxes", "archive"])
def test_a_token_hiding_a_bad_id_is_400(admin: Rest, source: dict, path: str, token: str) -> None:
    url = path.format(s=source["id"], r=source["runId"])
    assert_names(admin.get(f"{url}?pageToken={token}"), "pageToken")


BAD_BODY_TEXT = {
    "nul": "a\x00b",
    "line break": "a\nb",
    "bell": "a\x07b",
    "c1 control": "a\x85b",
}


@pytest.mark.parametrize("bad", BAD_BODY_TEXT.values(), ids=BAD_BODY_TEXT.keys())
@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/ingestion-sources", {"provider": "fake_tenant"}, "name"),
        ("/v1/ingestion-sources", {"name": "n"}, "provider"),
        ("/v1/api-keys", {"expiresInDays": 3}, "name"),
    ],
)
def test_bad_text_in_a_body_field_is_400_naming_it(
    admin: Rest, path: str, body: dict, field: str, bad: str
) -> None:
    sources_before = admin.get("/v1/ingestion-sources").json()
    keys_before = admin.get("/v1/api-keys").json()
    request = {"providerConfig": tenant_config(), **body, field: bad}
    assert_names(admin.post(path, json=request), field)
    assert admin.get("/v1/ingestion-sources").json() == sources_before
    assert admin.get("/v1/api-keys").json() == keys_before


@pytest.mark.parametrize("bad", ["a\x00b", "a\nb"], ids=["nul", "line break"])
@pytest.mark.parametrize("field", ["name", "provider", "status"])
def test_bad_text_in_an_update_is_400_and_changes_nothing(
    admin: Rest, source: dict, field: str, bad: str
) -> None:
    before = admin.get(f"/v1/ingestion-sources/{source['id']}").json()
    response = admin.put(f"/v1/ingestion-sources/{source['id']}", json={field: bad})
    assert_names(response, field)
    assert admin.get(f"/v1/ingestion-sources/{source['id']}").json() == before


@pytest.mark.parametrize("bad", ["a\x00b", "a\nb"], ids=["nul", "line break"])
@pytest.mark.parametrize("field", ["email", "password"])
def test_bad_text_at_login_is_400_naming_it(rest_url: str, field: str, bad: str) -> None:
    body = {"email": "admin@example.com", "password": "whatever-it-is", field: bad}
    assert_names(Rest(rest_url).post("/v1/auth/login", json=body), field)


@pytest.mark.parametrize(
    ("field", "limit"),
    [("name", 256), ("provider", 256), ("email", 256), ("password", 1024)],
)
def test_an_over_long_field_is_400_without_its_value(
    admin: Rest, rest_url: str, field: str, limit: int
) -> None:
    # Under the JSON body limit (512 KiB), so that the server sees it.
    long_value = "A" * 500_000
    if field in ("email", "password"):
        body = {"email": "admin@example.com", "password": "x", field: long_value}
        response = Rest(rest_url).post("/v1/auth/login", json=body)
    else:
        body = {"name": "n", "provider": "fake_tenant", "providerConfig": tenant_config()}
        response = admin.post("/v1/ingestion-sources", json={**body, field: long_value})
    assert_names(response, field)
    assert response.json()["details"][0]["fieldViolations"][0]["description"] == (
        f"must be at most {limit} characters"
    )
    assert len(response.content) < 1000


@pytest.mark.parametrize(
    "body",
    [b'{"name": "\\ud800", "provider": "x"}', b'{"name": "\xff", "provider": "x"}'],
    ids=["lone surrogate", "invalid utf-8"],
)
def test_json_text_that_is_not_unicode_is_a_json_400(admin: Rest, body: bytes) -> None:
    response = admin.post(
        "/v1/ingestion-sources", data=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["code"] == 3


def imap_config(**changes: object) -> dict:
    return {
        "host": "127.0.0.1",
        "port": 1,
        "secure": False,
        "username": "u",
        "password": "p",
        **changes,
    }


@pytest.mark.parametrize(
    ("provider", "config", "field"),
    [
        ("generic_imap", imap_config(host="127.0.0.1\x00garbage"), "providerConfig.host"),
        ("generic_imap", imap_config(host="127.0.0.1\tx"), "providerConfig.host"),
        ("generic_imap", imap_config(host="h" * 254), "providerConfig.host"),
        ("generic_imap", imap_config(host="h" * 500_000), "providerConfig.host"),
        ("generic_imap", imap_config(username="u\x00v"), "providerConfig.username"),
        ("generic_imap", imap_config(username="u\x1bv"), "providerConfig.username"),
        ("generic_imap", imap_config(username="u" * 1025), "providerConfig.username"),
        (
            "generic_imap",
            imap_config(includeFolders=["INBOX\x00"]),
            "providerConfig.includeFolders[0]",
        ),
        ("generic_imap", imap_config(**{"k" * 129: "v"}), "providerConfig (a key)"),
        ("generic_imap", imap_config(**{"a\x00b": "v"}), "providerConfig (a key)"),
        ("mbox_import", {"localFilePath": "a.mbox\x00.txt"}, "providerConfig.localFilePath"),
        ("mbox_import", {"localFilePath": "a\nb.mbox"}, "providerConfig.localFilePath"),
        ("mbox_import", {"localFilePath": "a/" * 2049}, "providerConfig.localFilePath"),
        ("pst_import", {"uploadedFilePath": "x\x07.pst"}, "providerConfig.uploadedFilePath"),
        (
            "google_workspace",
            {**GOOGLE_CONFIG, "impersonatedAdminEmail": "a@b.example\x00"},
            "providerConfig.impersonatedAdminEmail",
        ),
        (
            "google_workspace",
            {**GOOGLE_CONFIG, "serviceAccountKeyJson": "{" + " " * 20000 + "}"},
            "providerConfig.serviceAccountKeyJson",
        ),
        (
            "microsoft_365",
            {"tenantId": "t\x00", "clientId": "c", "clientSecret": "s"},
            "providerConfig.tenantId",
        ),
    ],
)
def test_bad_text_in_a_provider_config_is_400_naming_it(
    admin: Rest, provider: str, config: dict, field: str
) -> None:
    before = admin.get("/v1/ingestion-sources").json()
    response = admin.post(
        "/v1/ingestion-sources", json={"name": "n", "provider": provider, "providerConfig": config}
    )
    assert_names(response, field)
    # Never echoed: not the value, however long, nor a megabyte-long key.
    assert len(response.content) < 1000
    assert admin.get("/v1/ingestion-sources").json() == before


def nested(levels: int) -> object:
    value: object = "leaf"
    for level in range(levels):
        value = {"a": value} if level % 2 else [value]
    return value


@pytest.mark.parametrize("levels", [5, 30, 50, 99, 150])
def test_a_deeply_nested_provider_config_is_400(admin: Rest, source: dict, levels: int) -> None:
    config = {**imap_config(), "includeFolders": nested(levels)}
    create = admin.post(
        "/v1/ingestion-sources",
        json={"name": "n", "provider": "generic_imap", "providerConfig": config},
    )
    assert_names(create, "providerConfig")
    update = admin.put(f"/v1/ingestion-sources/{source['id']}", json={"providerConfig": config})
    assert_names(update, "providerConfig")


# --- JSON types the transcoder would coerce: checked in Envoy's Lua filter ----------


@pytest.fixture
def deletion_off(admin: Rest) -> Iterator[None]:
    """Deletion switched off for the test, and back as it was after."""
    was = admin.get("/v1/settings/system").json()["enableDeletion"]
    assert admin.put("/v1/settings/system", json={"enableDeletion": False}).status_code == 200
    yield
    admin.put("/v1/settings/system", json={"enableDeletion": was})


def deletion_enabled(admin: Rest) -> bool:
    enabled: bool = admin.get("/v1/settings/system").json()["enableDeletion"]
    return enabled


NOT_BOOLS = ["yes", "t", "1", "true", "True", "on", 1, 0, None, [True], {"value": True}]


@pytest.mark.usefixtures("deletion_off")
@pytest.mark.parametrize("value", NOT_BOOLS, ids=[json.dumps(v) for v in NOT_BOOLS])
@pytest.mark.parametrize("name", ["enableDeletion", "enable_deletion"])
def test_a_safety_setting_takes_only_json_true_or_false(
    admin: Rest, name: str, value: object
) -> None:
    response = admin.put("/v1/settings/system", json={name: value})
    assert_names(response, name)
    assert not deletion_enabled(admin)


@pytest.mark.usefixtures("deletion_off")
@pytest.mark.parametrize(
    ("query", "body"),
    [
        ("?enableDeletion=yes", b"{}"),
        ("?enable%44eletion=1", b"{}"),
        ("?enableDeletion=true&enableDeletion=t", b"{}"),
        ("", b'{"enable\\u0044eletion": "yes"}'),
        ("", b'{"enableDeletion": false, "enableDeletion": "yes"}'),
        ("", b"{'enableDeletion': 'yes'}"),
        ("", b'{enableDeletion: "yes"}'),
    ],
    ids=["query", "escaped query name", "repeated query", "escaped key", "twice", "quotes", "bare"],
)
def test_no_spelling_of_a_bool_slips_through(admin: Rest, query: str, body: bytes) -> None:
    response = admin.put(
        f"/v1/settings/system{query}", data=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["code"] == 3
    assert not deletion_enabled(admin)


@pytest.mark.usefixtures("deletion_off")
def test_json_true_and_false_still_work(admin: Rest) -> None:
    assert admin.put("/v1/settings/system", json={"enableDeletion": True}).json() == {
        "enableDeletion": True
    }
    assert admin.put("/v1/settings/system?enableDeletion=false", json={}).status_code == 200
    assert not deletion_enabled(admin)


@pytest.mark.parametrize("value", ["yes", "t", "1", "true", 1, 0])
@pytest.mark.parametrize(
    ("provider", "config", "field"),
    [
        ("generic_imap", imap_config(), "secure"),
        ("generic_imap", imap_config(), "allowInsecureCert"),
        ("google_workspace", GOOGLE_CONFIG, "includeSpamTrash"),
    ],
)
def test_a_provider_config_bool_takes_only_true_or_false(
    admin: Rest, provider: str, config: dict, field: str, value: object
) -> None:
    body = {"name": "n", "provider": provider, "providerConfig": {**config, field: value}}
    assert_names(admin.post("/v1/ingestion-sources", json=body), f"providerConfig.{field}")


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/ingestion-sources", {"name": ["a"], "provider": "fake_tenant"}, "name"),
        ("/v1/ingestion-sources", {"name": "n", "provider": ["fake_tenant"]}, "provider"),
        ("/v1/ingestion-sources", {"name": "n", "providerConfig": [{}]}, "providerConfig"),
        ("/v1/api-keys", {"name": "k", "expiresInDays": [3]}, "expiresInDays"),
        ("/v1/auth/login", {"email": ["a@b.example"], "password": "p"}, "email"),
    ],
)
def test_an_array_for_a_single_value_is_400_naming_the_field(
    admin: Rest, path: str, body: dict, field: str
) -> None:
    response = admin.post(path, json=body)
    assert_names(response, field)
    assert "list" in response.json()["message"]


def test_an_array_for_a_single_value_in_an_update_names_the_field(
    admin: Rest, source: dict
) -> None:
    before = admin.get(f"/v1/ingestion-sources/{source['id']}").json()
    response = admin.put(f"/v1/ingestion-sources/{source['id']}", json={"status": ["paused"]})
    assert_names(response, "status")
    assert admin.get(f"/v1/ingestion-sources/{source['id']}").json() == before


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/api-keys", {"name": {"a": "b"}, "expiresInDays": 3}, "name"),
        ("/v1/api-keys", {"name": "k", "expiresInDays": {}}, "expiresInDays"),
        ("/v1/auth/login", {"email": "a@b.example", "password": {"p": 1}}, "password"),
    ],
)
def test_an_object_for_a_string_or_number_is_400_naming_the_field(
    admin: Rest, path: str, body: dict, field: str
) -> None:
    assert_names(admin.post(path, json=body), field)


# --- Envoy's own errors never quote a long request back -----------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/api-keys", {"name": "k", "expiresInDays": "9" * 400_000}, 400),
        ("GET", "/v1/ingestion-sources/x/sync-sessions?pageSize=" + "9" * 30_000, None, 400),
        ("GET", "/v1/ingestion-sources?" + "x" * 30_000 + "=1", None, 400),
        ("GET", "/v1/" + "x" * 30_000, None, 404),
    ],
    ids=["invalid int in the body", "invalid int in the query", "unknown parameter", "path"],
)
def test_an_error_about_a_long_value_does_not_quote_it(
    admin: Rest, method: str, path: str, body: dict | None, status: int
) -> None:
    response = admin.request(method, path, json=body)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    assert len(response.content) < 1000
    assert "left out" in response.json()["message"]


@pytest.mark.parametrize(
    "header",
    [{"X-Trace-Bin": "!!!"}, {"Grpc-Timeout": "soon"}, {"grpc-encoding": "rot13"}],
    ids=["binary header, not base64", "grpc-timeout", "grpc-encoding"],
)
def test_grpc_protocol_headers_from_a_rest_client_are_dropped(admin: Rest, header: dict) -> None:
    # The gRPC server refused such a request with INTERNAL (500).
    response = admin.get("/v1/ingestion-sources", headers=header)
    assert response.status_code == 200, response.text
