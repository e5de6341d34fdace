"""Sign-in, API keys, every 401 case, and the permission matrix, through Envoy."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import jwt
import pytest

from ingestion_grpc.config import Settings
from ingestion_grpc.server import RunningServer
from tests.integration.test_sources_rest import create
from tests.support.fake_tenant import tenant_config
from tests.support.rest import Rest
from tests.support.services import ADMIN_EMAIL, ADMIN_PASSWORD

BAD_LOGIN = {"code": 16, "message": "Invalid email or password.", "details": []}


def test_login_returns_a_token_and_the_user(rest_url: str) -> None:
    response = Rest(rest_url).post(
        "/v1/auth/login", json={"email": ADMIN_EMAIL.upper(), "password": ADMIN_PASSWORD}
    )
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"accessToken", "user"}
    assert set(body["user"]) == {"id", "email", "role"}
    assert body["user"]["email"] == ADMIN_EMAIL
    assert body["user"]["role"] == "admin"


@pytest.mark.parametrize(
    ("email", "password"),
    [(ADMIN_EMAIL, "wrong password"), ("nobody@example.com", ADMIN_PASSWORD), ("", "")],
)
def test_bad_login_is_401_with_one_message(rest_url: str, email: str, password: str) -> None:
    response = Rest(rest_url).post("/v1/auth/login", json={"email": email, "password": password})
    assert response.status_code == 401
    assert response.json() == BAD_LOGIN


def _token(settings: Settings, user_id: str, secret: str | None = None, **claims: object) -> str:
    now = datetime.now(UTC)
    payload = {"sub": user_id, "iat": now, "exp": now + timedelta(hours=1), "iss": "ingestion-grpc"}
    payload.update(claims)
    return jwt.encode(payload, secret or settings.jwt_secret, algorithm="HS256")


def test_every_bad_credential_is_401(rest_url: str, admin: Rest, settings: Settings) -> None:
    me = admin.post("/v1/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    user_id = me.json()["user"]["id"]
    cases = {
        "missing": {},
        "not bearer": {"Authorization": f"Basic {admin.token}"},
        "malformed": {"Authorization": "Bearer not.a.jwt"},
        "expired": {
            "Authorization": "Bearer "
            + _token(settings, user_id, exp=datetime.now(UTC) - timedelta(seconds=5))
        },
        "wrong signature": {
            "Authorization": "Bearer " + _token(settings, user_id, secret="another-secret" * 3)
        },
        "unknown user": {"Authorization": "Bearer " + _token(settings, "no-such-user")},
        "unknown api key": {"X-API-KEY": "ik_unknown"},
    }
    for name, headers in cases.items():
        response = Rest(rest_url).get("/v1/ingestion-sources", headers=headers)
        assert response.status_code == 401, name
        assert response.json()["code"] == 16, name


def test_api_key_lifecycle(make_client: Callable[[str], Rest], rest_url: str) -> None:
    alice = make_client("user")
    created = alice.post("/v1/api-keys", json={"name": "ci", "expiresInDays": 30})
    assert created.status_code == 201
    body = created.json()
    assert set(body) == {"id", "name", "key", "expiresAt", "createdAt"}
    expires = datetime.fromisoformat(body["expiresAt"].replace("Z", "+00:00"))
    assert abs(expires - (datetime.now(UTC) + timedelta(days=30))) < timedelta(minutes=1)

    by_key = Rest(rest_url, api_key=body["key"])
    source = create(by_key)
    assert [s["id"] for s in alice.get("/v1/ingestion-sources").json()] == [source["id"]]

    listed = alice.get("/v1/api-keys").json()["apiKeys"]
    assert [k["id"] for k in listed] == [body["id"]]
    assert "key" not in listed[0]
    assert body["key"] not in str(listed)

    bob = make_client("user")
    assert bob.delete(f"/v1/api-keys/{body['id']}").status_code == 404
    revoked = alice.delete(f"/v1/api-keys/{body['id']}")
    assert (revoked.status_code, revoked.content) == (204, b"")
    assert by_key.get("/v1/ingestion-sources").status_code == 401
    assert alice.get("/v1/api-keys").json() == {"apiKeys": []}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "k", "expiresInDays": 0}, "expiresInDays"),
        ({"name": "k", "expiresInDays": 731}, "expiresInDays"),
        ({"name": "k"}, "expiresInDays"),
        ({"name": "", "expiresInDays": 5}, "name"),
    ],
)
def test_api_key_validation(admin: Rest, body: dict, field: str) -> None:
    response = admin.post("/v1/api-keys", json=body)
    assert response.status_code == 400
    assert response.json()["details"][0]["fieldViolations"][0]["field"] == field


def test_expired_api_key_is_401(
    make_client: Callable[[str], Rest], rest_url: str, grpc_server: RunningServer
) -> None:
    from sqlalchemy import update

    from ingestion_grpc.db.models import ApiKey

    alice = make_client("user")
    key = alice.post("/v1/api-keys", json={"name": "old", "expiresInDays": 1}).json()
    with grpc_server.database.unit_of_work() as uow:
        uow.session.execute(
            update(ApiKey)
            .where(ApiKey.id == key["id"])
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
        uow.commit()
    response = Rest(rest_url, api_key=key["key"]).get("/v1/ingestion-sources")
    assert response.status_code == 401
    assert "expired" in response.json()["message"]


CALLS: dict[str, tuple[str, str, dict | None]] = {
    "create": ("POST", "/v1/ingestion-sources", None),
    "list": ("GET", "/v1/ingestion-sources", None),
    "get": ("GET", "/v1/ingestion-sources/{id}", None),
    "update": ("PUT", "/v1/ingestion-sources/{id}", {"name": "changed"}),
    "delete": ("DELETE", "/v1/ingestion-sources/{id}", None),
    "import": ("POST", "/v1/ingestion-sources/{id}/import", None),
    "pause": ("POST", "/v1/ingestion-sources/{id}/pause", None),
    "sync": ("POST", "/v1/ingestion-sources/{id}/sync", None),
    "get settings": ("GET", "/v1/settings/system", None),
    "put settings": ("PUT", "/v1/settings/system", {"enableDeletion": False}),
}


def create_body() -> dict[str, object]:
    return {"name": "n", "provider": "fake_tenant", "providerConfig": tenant_config()}


def _call(client: Rest, name: str, source_id: str) -> int:
    method, path, body = CALLS[name]
    if name == "create":
        body = create_body()
    return client.request(method, path.format(id=source_id), json=body).status_code


def test_viewer_may_only_read(make_client: Callable[[str], Rest], admin: Rest) -> None:
    viewer = make_client("viewer")
    source = create(admin)
    allowed = {"list": 200, "get": 200}
    for name in CALLS:
        expected = allowed.get(name, 403)
        assert _call(viewer, name, source["id"]) == expected, name


def test_user_without_settings_permission_and_foreign_sources_are_hidden(
    make_client: Callable[[str], Rest],
) -> None:
    owner, other = make_client("user"), make_client("user")
    source = create(owner)
    for name in ("get", "update", "delete", "import", "pause", "sync"):
        assert _call(other, name, source["id"]) == 404, name
    assert _call(other, "get settings", source["id"]) == 403
    assert _call(other, "put settings", source["id"]) == 403
    assert source["id"] not in {s["id"] for s in other.get("/v1/ingestion-sources").json()}


def test_admin_acts_on_every_source(make_client: Callable[[str], Rest], admin: Rest) -> None:
    source = create(make_client("user"))
    assert _call(admin, "pause", source["id"]) == 200
    assert _call(admin, "update", source["id"]) == 200
