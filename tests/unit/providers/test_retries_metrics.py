"""Every attempt of a provider call is counted, by the provider the engine works for,
and a refusal as one too many (429) apart from other retries."""

from __future__ import annotations

from prometheus_client import REGISTRY

from ingestion_grpc.providers.retries import RetryLater, with_retries
from ingestion_grpc.telemetry import context

PROVIDER = "unit_test_provider"


def count(name: str) -> float:
    return REGISTRY.get_sample_value(name, {"provider": PROVIDER}) or 0.0


def test_attempts_retries_and_throttling_are_counted_for_the_bound_provider() -> None:
    answers: list[Exception | str] = [
        RetryLater("HTTP 429", retry_after=0, throttled=True),
        RetryLater("HTTP 503"),
        "ok",
    ]

    def call() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    before = {
        n: count(n)
        for n in (
            "ingestion_provider_requests_total",
            "ingestion_provider_retries_total",
            "ingestion_provider_throttled_total",
        )
    }
    with context.bound(provider=PROVIDER):
        assert with_retries(call, sleep=lambda _: None) == "ok"
    assert (
        count("ingestion_provider_requests_total") - before["ingestion_provider_requests_total"]
        == 3
    )
    assert (
        count("ingestion_provider_retries_total") - before["ingestion_provider_retries_total"] == 2
    )
    assert (
        count("ingestion_provider_throttled_total") - before["ingestion_provider_throttled_total"]
        == 1
    )


def test_a_subclass_may_say_it_is_throttling() -> None:
    class Throttled(RetryLater):
        throttled = True

    assert Throttled("429").throttled
    assert not RetryLater("503").throttled
    assert not Throttled("429", throttled=False).throttled
