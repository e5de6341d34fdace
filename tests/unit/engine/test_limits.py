"""RedisLimiter against a real Redis: rates held across threads and processes,
concurrency never exceeded, leases of killed holders freed, renewals kept."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest
import redis

from ingestion_grpc.engine import limits as limits_module
from ingestion_grpc.engine.limits import RedisLimiter, redis_limiter
from ingestion_grpc.providers.base import ConcurrencyLimit, Limit, RateLimit

if TYPE_CHECKING:
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Barrier

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

BUCKET = RateLimit("bucket", rate=50, burst=5)
SLOTS = ConcurrencyLimit("slots", limit=3, lease_seconds=5)
LIMITS: tuple[Limit, ...] = (BUCKET, SLOTS)

# A limiter that loses places makes its waiters wait for ever: fail instead.
pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def namespace(client: redis.Redis) -> Iterator[str]:
    namespace = f"limits-test-{uuid.uuid4().hex[:12]}"
    yield namespace
    for key in client.scan_iter(f"{namespace}:*"):
        client.delete(key)


def limiter(client: redis.Redis, namespace: str, *limits: Limit) -> RedisLimiter:
    return RedisLimiter(client, namespace, limits or LIMITS)


def assert_rate_held(grants: Sequence[float], rate: float, burst: float) -> None:
    """No stretch of time saw more than `burst` plus `rate` a second granted.

    A grant is stamped after its sleep ends, so a late wake-up moves it into a
    later stretch: allow 0.2 s of lateness (a busy machine).
    """
    times = sorted(grants)
    for first in range(len(times)):
        for last in range(first, len(times)):
            granted = last - first + 1
            allowed = burst + rate * (times[last] - times[first] + 0.2)
            assert granted <= allowed, f"{granted} units in {times[last] - times[first]:.3f}s"


def test_the_rate_is_held_across_threads(client: redis.Redis, namespace: str) -> None:
    limits = limiter(client, namespace)
    grants: list[float] = []

    def spend(units: int) -> None:
        for _ in range(units):
            limits.acquire("bucket", "user@example.com")
            grants.append(time.monotonic())

    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(spend, [15] * 4))
    elapsed = time.monotonic() - start

    expected = (60 - BUCKET.burst) / BUCKET.rate  # the burst is free, the rest at the rate
    assert expected * 0.95 <= elapsed <= expected + 0.7
    assert_rate_held(grants, BUCKET.rate, BUCKET.burst)


def test_keys_are_separate_buckets(client: redis.Redis, namespace: str) -> None:
    limits = limiter(client, namespace, RateLimit("slow", rate=1, burst=1))
    start = time.monotonic()
    for user in ("a@example.com", "b@example.com"):
        limits.acquire("slow", user)
    assert time.monotonic() - start < 0.5  # one bucket would have made the second wait 1 s


def test_a_cost_above_the_burst_waits_for_it(client: redis.Redis, namespace: str) -> None:
    limits = limiter(client, namespace, RateLimit("big", rate=100, burst=2))
    start = time.monotonic()
    limits.acquire("big", "k", cost=10)
    first = time.monotonic() - start
    limits.acquire("big", "k", cost=10)
    second = time.monotonic() - start
    assert 0.08 * 0.95 <= first <= 0.08 + 0.3  # (10 - 2) / 100
    assert 0.18 * 0.95 <= second <= 0.18 + 0.3  # (20 - 2) / 100


def test_an_idle_bucket_expires_once_full_again(client: redis.Redis, namespace: str) -> None:
    limits = limiter(client, namespace)
    limits.acquire("bucket", "k", cost=2)
    ttl = client.pttl(f"{namespace}:limit:bucket:k")
    # Full again after 2 / 50 s; the key keeps one more second.
    assert 0 < ttl <= 1040


def test_units_of_an_interrupted_wait_are_given_back(
    client: redis.Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits = limiter(client, namespace, RateLimit("slow", rate=1, burst=1))
    limits.acquire("slow", "k")  # the burst: the bucket is empty now

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(limits_module, "_sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        limits.acquire("slow", "k", cost=5)
    tokens = float(client.hget(f"{namespace}:limit:slow:k", "tokens") or "nan")
    assert -0.1 < tokens <= 1  # not -5: the 5 units came back


def _spend_from_another_process(
    namespace: str, units: int, ready: Barrier, grants: Queue[float]
) -> None:
    limits = redis_limiter(REDIS_URL, namespace, LIMITS)
    ready.wait()
    for _ in range(units):
        limits.acquire("bucket", "shared")
        grants.put(time.time())


def test_processes_share_one_bucket(namespace: str) -> None:
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Barrier(3)
    grants: Queue[float] = spawn.Queue()
    workers = [
        spawn.Process(target=_spend_from_another_process, args=(namespace, 30, ready, grants))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    ready.wait(timeout=20)
    start = time.time()
    stamps = [grants.get(timeout=10) for _ in range(60)]
    for worker in workers:
        worker.join(timeout=10)
        assert worker.exitcode == 0

    # Each alone would take (30 - 5) / 50 s; together they wait for each other.
    elapsed = max(stamps) - start
    expected = (60 - BUCKET.burst) / BUCKET.rate
    assert expected * 0.95 <= elapsed <= expected + 0.7
    assert_rate_held(stamps, BUCKET.rate, BUCKET.burst)


def test_the_concurrency_limit_is_never_exceeded(client: redis.Redis, namespace: str) -> None:
    limits = limiter(client, namespace)
    lock = threading.Lock()
    inside = 0
    most = 0

    def work(_: int) -> None:
        nonlocal inside, most
        for _ in range(5):
            with limits.slot("slots", "mailbox"):
                with lock:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0.01)
                with lock:
                    inside -= 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))

    assert most == SLOTS.limit
    assert client.zcard(f"{namespace}:limit:slots:mailbox") == 0


def test_a_slot_is_released_on_an_exception(client: redis.Redis, namespace: str) -> None:
    limits = limiter(client, namespace, ConcurrencyLimit("one", limit=1))
    with pytest.raises(RuntimeError, match="inside"), limits.slot("one", "k"):
        raise RuntimeError("inside")
    assert client.zcard(f"{namespace}:limit:one:k") == 0
    start = time.monotonic()
    with limits.slot("one", "k"):
        pass
    assert time.monotonic() - start < 0.5


def _hold_forever(namespace: str, held: Queue[str]) -> None:
    limits = redis_limiter(REDIS_URL, namespace, [ConcurrencyLimit("one", 1, lease_seconds=0.5)])
    with limits.slot("one", "k"):
        held.put("held")
        time.sleep(60)


def test_a_killed_holders_place_frees_when_its_lease_expires(
    client: redis.Redis, namespace: str
) -> None:
    spawn = multiprocessing.get_context("spawn")
    held: Queue[str] = spawn.Queue()
    holder = spawn.Process(target=_hold_forever, args=(namespace, held))
    holder.start()
    try:
        assert held.get(timeout=20) == "held"
        holder.kill()
        killed = time.monotonic()
    finally:
        holder.join(timeout=10)

    limits = limiter(client, namespace, ConcurrencyLimit("one", 1, lease_seconds=0.5))
    with limits.slot("one", "k"):
        waited = time.monotonic() - killed
    # The holder's renewer may have renewed just before the kill: at most one lease.
    assert waited <= 0.5 + 0.5


def test_a_lease_left_behind_expires(client: redis.Redis, namespace: str) -> None:
    seconds, microseconds = client.time()
    expiry = seconds + microseconds / 1e6 + 0.5
    leases = f"{namespace}:limit:one:k"
    # What a holder that never released leaves behind (limits' own clock is Redis's).
    client.zadd(leases, {"left-behind": expiry})
    limits = limiter(client, namespace, ConcurrencyLimit("one", limit=1))
    with limits.slot("one", "k"):
        entered = time.time()
    assert expiry - 0.05 <= entered <= expiry + 0.5
    assert client.zscore(leases, "left-behind") is None


def test_a_place_held_past_its_lease_is_renewed(client: redis.Redis, namespace: str) -> None:
    short = ConcurrencyLimit("one", limit=1, lease_seconds=0.3)
    limits = limiter(client, namespace, short)
    entered = threading.Event()
    left_at = 0.0

    def hold() -> None:
        nonlocal left_at
        with limits.slot("one", "k"):
            entered.set()
            time.sleep(1.0)  # more than three leases
            left_at = time.monotonic()

    holder = threading.Thread(target=hold)
    holder.start()
    entered.wait(timeout=5)
    # Another limiter on its own connections, as another process would have.
    other = redis.Redis.from_url(REDIS_URL)
    with limiter(other, namespace, short).slot("one", "k"):
        second_at = time.monotonic()
    other.close()
    holder.join()
    assert second_at >= left_at


def test_unknown_names_are_errors(client: redis.Redis, namespace: str) -> None:
    limits = limiter(client, namespace)
    with pytest.raises(KeyError, match="no limit named 'nope' was declared"):
        limits.acquire("nope", "k")
    with (
        pytest.raises(KeyError, match="no limit named 'nope' was declared"),
        limits.slot("nope", "k"),
    ):
        pass
    with pytest.raises(KeyError, match="concurrency limit"):
        limits.acquire("slots", "k")
    with pytest.raises(KeyError, match="rate limit"), limits.slot("bucket", "k"):
        pass


def test_bad_declarations_are_errors(client: redis.Redis, namespace: str) -> None:
    with pytest.raises(ValueError, match="declared twice"):
        limiter(client, namespace, RateLimit("a", 1, 1), RateLimit("a", 2, 1))
    with pytest.raises(ValueError, match="rate and burst"):
        limiter(client, namespace, RateLimit("a", 0, 1))
    with pytest.raises(ValueError, match="limit must be"):
        limiter(client, namespace, ConcurrencyLimit("a", 0))
    with pytest.raises(ValueError, match="cost"):
        limiter(client, namespace).acquire("bucket", "k", cost=-1)
