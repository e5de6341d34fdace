"""The sign-in counters in a real Redis (the machine's, under a namespace of our own)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis

from ingestion_grpc.auth.login_limits import LoginLimits, LoginThrottle, TooManyLogins
from tests.support.services import REDIS_URL

LIMITS = LoginLimits(
    max_failures_per_account=2, max_failures_per_address=3, window=timedelta(minutes=5)
)


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def namespace(client: redis.Redis) -> Iterator[str]:
    namespace = f"ingestion-test-throttle-{uuid.uuid4().hex[:8]}"
    yield namespace
    for key in client.scan_iter(f"{namespace}:*"):
        client.delete(key)


def keys(client: redis.Redis, namespace: str) -> dict[str, tuple[int, int]]:
    """Each counter's kind (account / address), value and whether it expires."""
    found = {}
    for key in client.scan_iter(f"{namespace}:*"):
        kind = key.decode().split(":")[2]
        found[kind] = (int(client.get(key) or 0), client.ttl(key))
    return found


def test_counters_live_only_for_their_window(client: redis.Redis, namespace: str) -> None:
    throttle = LoginThrottle(client, namespace, LIMITS)
    throttle.attempt("Alice@Example.com", "192.0.2.1")
    counted = keys(client, namespace)
    assert {kind: value for kind, (value, _) in counted.items()} == {"account": 1, "address": 1}
    assert all(0 < ttl <= 300 for _, ttl in counted.values())
    # The same account whatever the case; a success clears it and takes the attempt back.
    throttle.succeeded("alice@example.com", "192.0.2.1")
    assert {kind: value for kind, (value, _) in keys(client, namespace).items()} == {"address": 0}


def test_a_success_after_the_window_ended_leaves_no_counter_behind(
    client: redis.Redis, namespace: str
) -> None:
    throttle = LoginThrottle(client, namespace, LIMITS)
    throttle.attempt("bob@example.com", "192.0.2.2")
    for key in client.scan_iter(f"{namespace}:*"):
        client.delete(key)  # the window ended while the password was checked
    throttle.succeeded("bob@example.com", "192.0.2.2")
    assert keys(client, namespace) == {}


def test_refused_attempts_are_not_counted(client: redis.Redis, namespace: str) -> None:
    throttle = LoginThrottle(client, namespace, LIMITS)
    for _ in range(2):
        throttle.attempt("carol@example.com", "192.0.2.3")
    for _ in range(5):
        with pytest.raises(TooManyLogins) as refused:
            throttle.attempt("carol@example.com", "192.0.2.3")
        retry_after = refused.value.retry_after
        assert retry_after is not None and 0 < retry_after <= 300
    counted = {kind: value for kind, (value, _) in keys(client, namespace).items()}
    assert counted == {"account": 2, "address": 2}
