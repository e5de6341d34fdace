"""Failed sign-ins are limited per account and per client address (a server and an
Envoy of this module's own, with small limits). Each test signs in from loopback
addresses of its own (127.0.0.x), which Envoy sees as different clients."""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis
import requests
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from ingestion.v1 import auth_service_pb2, auth_service_pb2_grpc

from ingestion_grpc.auth.permissions import Role
from ingestion_grpc.auth.services import create_user
from ingestion_grpc.config import Settings
from ingestion_grpc.server import RunningServer, start_server
from tests.support.envoy import EnvoyProxy, start_envoy
from tests.support.services import ADMIN_EMAIL, ADMIN_PASSWORD, REDIS_URL

PER_ACCOUNT = 2
PER_ADDRESS = 4
WINDOW_SECONDS = 600
BAD_LOGIN = {"code": 16, "message": "Invalid email or password.", "details": []}
BLOCKED = re.compile(r"Too many failed sign-ins; try again in (\d+) seconds\.")


@dataclass
class Limited:
    server: RunningServer
    envoy: EnvoyProxy

    def new_user(self) -> tuple[str, str]:
        email = f"limited-{uuid.uuid4().hex[:10]}@example.com"
        password = secrets.token_urlsafe(12)
        with self.server.database.unit_of_work() as uow:
            create_user(uow, email, password, Role.USER)
            uow.commit()
        return email, password

    def login(self, address: str, email: str, password: str, **headers: str) -> requests.Response:
        """POST /v1/auth/login from `address` (a 127.0.0.x of the test's choosing)."""
        with requests.Session() as session:
            session.mount("http://", _FromAddress(address))
            return session.post(
                f"{self.envoy.base_url}/v1/auth/login",
                json={"email": email, "password": password},
                headers=headers,
                timeout=10,
            )


class _FromAddress(requests.adapters.HTTPAdapter):
    """Connects from a given local address."""

    def __init__(self, address: str) -> None:
        self._address = address
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self._address, 0)
        super().init_poolmanager(*args, **kwargs)


@pytest.fixture(scope="module")
def limited(
    environment: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Limited]:
    namespace = f"ingestion-test-login-{uuid.uuid4().hex[:8]}"
    settings = Settings.from_env(
        {
            **environment,
            "QUEUE_NAMESPACE": namespace,
            "LOGIN_MAX_FAILURES_PER_ACCOUNT": str(PER_ACCOUNT),
            "LOGIN_MAX_FAILURES_PER_ADDRESS": str(PER_ADDRESS),
            "LOGIN_FAILURE_WINDOW": f"{WINDOW_SECONDS}s",
        }
    )
    server = start_server(settings, port=0)
    envoy = start_envoy(server.port, tmp_path_factory.mktemp("login-envoy"))
    try:
        envoy.wait_healthy()
        yield Limited(server, envoy)
    finally:
        envoy.stop()
        server.stop(grace=1)
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"{namespace}:*"):
            client.delete(key)
        client.close()


def assert_blocked(response: requests.Response) -> int:
    """A 429 with Retry-After; the seconds it says."""
    assert response.status_code == 429, response.text
    retry_after = int(response.headers["retry-after"])
    assert 0 < retry_after <= WINDOW_SECONDS
    body = response.json()
    assert body["code"] == 8
    match = BLOCKED.fullmatch(body["message"])
    assert match is not None, body
    assert int(match.group(1)) == retry_after
    assert body["details"] == [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_after}s"}
    ]
    return retry_after


def test_an_account_is_locked_past_its_failures_even_for_the_right_password(
    limited: Limited,
) -> None:
    email, password = limited.new_user()
    for _ in range(PER_ACCOUNT):
        refused = limited.login("127.0.0.2", email, "wrong password")
        assert (refused.status_code, refused.json()) == (401, BAD_LOGIN)
    assert_blocked(limited.login("127.0.0.2", email, password))
    # Locked for everyone, not just the address that failed.
    assert_blocked(limited.login("127.0.0.3", email, password))
    # Other accounts are not.
    other, other_password = limited.new_user()
    assert limited.login("127.0.0.3", other, other_password).status_code == 200


def test_an_unknown_account_is_answered_exactly_like_a_known_one(limited: Limited) -> None:
    known, _ = limited.new_user()
    unknown = f"nobody-{uuid.uuid4().hex[:10]}@example.com"
    answers: dict[str, list[tuple[int, Any]]] = {}
    for email, address in ((known, "127.0.0.4"), (unknown, "127.0.0.5")):
        answers[email] = [
            (r.status_code, r.json() if r.status_code == 401 else None)
            for r in (limited.login(address, email, "wrong") for _ in range(PER_ACCOUNT))
        ]
        assert_blocked(limited.login(address, email, "wrong"))
    assert answers[known] == answers[unknown] == [(401, BAD_LOGIN)] * PER_ACCOUNT


def test_a_successful_sign_in_clears_the_account_count(limited: Limited) -> None:
    email, password = limited.new_user()
    # More failures than the account's limit in all, fewer than the address's.
    rounds = 3
    assert PER_ACCOUNT < rounds * (PER_ACCOUNT - 1) < PER_ADDRESS
    for _ in range(rounds):
        for _ in range(PER_ACCOUNT - 1):
            assert limited.login("127.0.0.6", email, "wrong").status_code == 401
        assert limited.login("127.0.0.6", email, password).status_code == 200


def test_an_address_is_blocked_past_its_failures_and_cannot_pose_as_another(
    limited: Limited,
) -> None:
    for n in range(PER_ADDRESS):
        tried = f"spray-{n}-{uuid.uuid4().hex[:6]}@example.com"
        assert limited.login("127.0.0.7", tried, "guess").status_code == 401
    assert_blocked(limited.login("127.0.0.7", ADMIN_EMAIL, ADMIN_PASSWORD))
    # Headers naming another client change nothing: Envoy sets the address itself.
    spoofed = limited.login(
        "127.0.0.7",
        ADMIN_EMAIL,
        ADMIN_PASSWORD,
        **{"X-Client-Address": "10.1.2.3", "X-Forwarded-For": "10.1.2.3"},
    )
    assert_blocked(spoofed)
    assert limited.login("127.0.0.8", ADMIN_EMAIL, ADMIN_PASSWORD).status_code == 200


def test_a_native_grpc_client_gets_resource_exhausted_with_retry_info(limited: Limited) -> None:
    email, password = limited.new_user()
    request = auth_service_pb2.LoginRequest(email=email, password="wrong")
    with grpc.insecure_channel(f"127.0.0.1:{limited.server.port}") as channel:
        stub = auth_service_pb2_grpc.AuthServiceStub(channel)
        for _ in range(PER_ACCOUNT):
            with pytest.raises(grpc.RpcError) as failed:
                stub.Login(request, timeout=10)
            assert failed.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as blocked:
            stub.Login(auth_service_pb2.LoginRequest(email=email, password=password), timeout=10)
    assert blocked.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(blocked.value)
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry)
    assert 0 < retry.retry_delay.seconds <= WINDOW_SECONDS
    assert dict(blocked.value.initial_metadata())["retry-after"] == str(retry.retry_delay.seconds)
