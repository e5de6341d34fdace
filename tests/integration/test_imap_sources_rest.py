"""generic_imap sources against a real Dovecot, and the credential-leak search."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.test_sources_rest import create
from tests.integration.test_validation_rest import GOOGLE_CONFIG
from tests.support.dovecot import Dovecot
from tests.support.rest import RECEIVED_BODIES, Rest


@pytest.fixture
def user(make_client: Callable[[str], Rest]) -> Rest:
    return make_client("user")


def imap_body(dovecot: Dovecot, email: str, **overrides: object) -> dict:
    config = dovecot.provider_config(email, secure=True, allow_insecure_cert=True)
    config.update(overrides)
    return {"name": "Mailbox", "provider": "generic_imap", "providerConfig": config}


def test_create_checks_the_login_first(user: Rest, dovecot: Dovecot) -> None:
    email = dovecot.new_user("create")
    response = user.post("/v1/ingestion-sources", json=imap_body(dovecot, email))
    assert response.status_code == 201, response.text
    assert response.json()["provider"] == "generic_imap"
    assert response.json()["status"] == "importing"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"password": "wrong-password"}, "authentication failed"),
        ({"allowInsecureCert": False}, "TLS handshake failed"),
        ({"host": "imap.no-such-host.invalid"}, "could not resolve host"),
    ],
)
def test_a_failed_check_is_400_and_creates_nothing(
    user: Rest, dovecot: Dovecot, overrides: dict, expected: str
) -> None:
    email = dovecot.new_user("failing")
    response = user.post("/v1/ingestion-sources", json=imap_body(dovecot, email, **overrides))
    assert response.status_code == 400
    assert response.json()["message"].startswith("Connection check failed: ")
    assert expected in response.json()["message"]
    assert user.get("/v1/ingestion-sources").json() == []


def test_refused_port_is_400(user: Rest, dovecot: Dovecot) -> None:
    email = dovecot.new_user("refused")
    body = imap_body(dovecot, email, port=1, secure=False)
    response = user.post("/v1/ingestion-sources", json=body)
    assert response.status_code == 400
    assert "refused" in response.json()["message"]


def test_update_keeps_a_stored_secret_that_is_omitted_or_empty(
    user: Rest, dovecot: Dovecot
) -> None:
    email = dovecot.new_user("merge")
    source = user.post("/v1/ingestion-sources", json=imap_body(dovecot, email)).json()
    path = f"/v1/ingestion-sources/{source['id']}"
    # The connection is checked again with the merged config: it logs in only
    # if the stored password was kept.
    for config in ({"excludeFolders": ["Trash"]}, {"password": ""}, {"password": None}):
        response = user.put(path, json={"providerConfig": config})
        assert response.status_code == 200, (config, response.text)
    wrong = user.put(path, json={"providerConfig": {"password": "not-it"}})
    assert wrong.status_code == 400
    assert "authentication failed" in wrong.json()["message"]


def test_credentials_never_leave_the_server(
    make_client: Callable[[str], Rest],
    dovecot: Dovecot,
    caplog: pytest.LogCaptureFixture,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    caplog.set_level(logging.DEBUG)
    owner = make_client("user")
    email = dovecot.new_user("leak")
    password = dovecot.password(email)
    body = imap_body(dovecot, email)
    created = owner.post("/v1/ingestion-sources", json=body).json()
    path = f"/v1/ingestion-sources/{created['id']}"
    new_password = "S3cret-" + secrets.token_hex(8)
    owner.put(path, json={"providerConfig": {"password": new_password}})  # fails the check
    owner.put(path, json={"name": "renamed", "providerConfig": {"password": password}})
    owner.get(path)
    owner.get("/v1/ingestion-sources")
    owner.post(path + "/pause")
    other = create(owner)
    owner.put(f"/v1/ingestion-sources/{other['id']}", json={"name": "renamed"})
    # A key whose private key is not one: refused at the check, never quoted.
    owner.post(
        "/v1/ingestion-sources",
        json={"name": "g", "provider": "google_workspace", "providerConfig": GOOGLE_CONFIG},
    )
    owner.post("/v1/ingestion-sources", json=imap_body(dovecot, email, password=new_password))
    owner.post(
        "/v1/ingestion-sources",
        json={
            "name": "g",
            "provider": "google_workspace",
            "providerConfig": {"serviceAccountKeyJson": "{not json " + new_password},
        },
    )

    secrets_to_find = [password, new_password, "TOP-SECRET-KEY-MATERIAL"]
    envoy_logs = "".join(
        p.read_text(errors="replace")
        for p in Path(tmp_path_factory.getbasetemp()).rglob("envoy-*.log")
    )
    haystacks = {
        "responses": b"\n".join(RECEIVED_BODIES).decode(errors="replace"),
        "server logs": "\n".join(r.getMessage() for r in caplog.records),
        "envoy logs": envoy_logs,
    }
    for where, text in haystacks.items():
        for secret in secrets_to_find:
            assert secret not in text, f"a credential appears in the {where}"
