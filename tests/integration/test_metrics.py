"""`GET /metrics` through Envoy, covering the test server and a real worker process,
scraped while an import waits and runs and after it: the counters must say what the
archive says (the shared SpamAssassin spam mbox, 500 messages)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from ingestion_grpc.config import Settings
from ingestion_grpc.server import RunningServer
from tests.support.corpora import SPAM, mbox_messages
from tests.support.rest import Rest
from tests.support.sources import archived, create_source, latest_run, runs, settled
from tests.support.workers import Worker

PROVIDER = "mbox_import"
SPAM_COUNT = 500


@dataclass(frozen=True)
class Scrape:
    """One scrape of `/metrics`: every sample by (name, labels)."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    content_type: str

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels` (0 if none)."""
        wanted = set(labels.items())
        return sum(
            value
            for (sample, sample_labels), value in self.samples.items()
            if sample == name and wanted <= sample_labels
        )

    def __sub__(self, before: Scrape) -> Callable[..., float]:
        return lambda name, **labels: self.value(name, **labels) - before.value(name, **labels)


def scrape(base_url: str) -> Scrape:
    response = requests.get(f"{base_url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(samples, response.headers["content-type"])


@pytest.fixture
def folder(settings: Settings) -> Iterator[Path]:
    """A folder of this test's own inside IMPORT_ROOT."""
    path = settings.import_root / uuid.uuid4().hex[:12]
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_an_import_is_counted_exactly_as_the_archive_counts_it(
    admin: Rest,
    rest_url: str,
    grpc_server: RunningServer,
    settings: Settings,
    folder: Path,
    start_worker: Callable[[], Worker],
) -> None:
    mbox = folder / "spam.mbox"
    shutil.copyfile(SPAM, mbox)
    expected_bytes = sum(len(raw) for raw in mbox_messages(SPAM))
    before = scrape(rest_url)
    assert before.content_type.startswith("text/plain")

    # No worker yet: the import waits in the queue, and nothing is counted.
    source = create_source(
        admin,
        "metrics",
        PROVIDER,
        {"localFilePath": mbox.relative_to(settings.import_root).as_posix()},
    )
    waiting = scrape(rest_url)
    assert waiting.value("ingestion_queue_messages") >= 1
    assert (waiting - before)("ingestion_messages_fetched_total", provider=PROVIDER) == 0
    created = (waiting - before)(
        "grpc_server_handled_total", grpc_method="CreateIngestionSource", grpc_code="OK"
    )
    assert created == 1

    # While it runs: a scrape never counts more than the run has committed.
    start_worker()
    while True:
        during = scrape(rest_url)
        run = latest_run(admin, source["id"])
        delta = during - before
        assert (
            delta("ingestion_messages_archived_total", provider=PROVIDER) <= run["messagesArchived"]
        )
        assert (
            delta("ingestion_messages_fetched_total", provider=PROVIDER) <= run["messagesFetched"]
        )
        if run["status"] != "running":
            break
    assert settled(admin, source["id"])["status"] == "imported"

    after = scrape(rest_url)
    delta = after - before
    run = latest_run(admin, source["id"])
    rows = archived(admin, source["id"])
    assert len(rows) == run["messagesArchived"] == SPAM_COUNT
    assert delta("ingestion_messages_fetched_total", provider=PROVIDER) == run["messagesFetched"]
    assert delta("ingestion_messages_archived_total", provider=PROVIDER) == SPAM_COUNT
    assert delta("ingestion_messages_already_present_total", provider=PROVIDER) == 0
    assert delta("ingestion_messages_skipped_total", provider=PROVIDER) == 0
    assert delta("ingestion_messages_failed_total", provider=PROVIDER) == 0
    assert delta("ingestion_archived_bytes_total", provider=PROVIDER) == expected_bytes
    assert sum(row["sizeBytes"] for row in rows) == expected_bytes
    mailbox_runs = "ingestion_mailbox_run_seconds_count"
    assert delta(mailbox_runs, provider=PROVIDER, outcome="done") == run["mailboxesDone"] == 1
    # The worker's jobs: the run's listing and its one mailbox, both done.
    assert delta("ingestion_job_seconds_count", actor="import_source", outcome="ok") >= 1
    assert delta("ingestion_job_seconds_count", actor="ingest_mailbox", outcome="ok") >= 1
    assert delta("ingestion_job_wait_seconds_count", actor="import_source") >= 1
    assert delta("ingestion_blob_write_seconds_count", store="local") >= 1
    assert after.value("ingestion_queue_messages") < waiting.value("ingestion_queue_messages")
    listed = delta("grpc_server_handled_total", grpc_method="ListSyncSessions", grpc_code="OK")
    assert listed >= len(runs(admin, source["id"]))
    assert delta("grpc_server_handling_seconds_count", grpc_method="ListSyncSessions") == listed

    # Importing again reads all 500 again: each is counted as already present.
    assert admin.post(f"/v1/ingestion-sources/{source['id']}/import").status_code == 202
    assert settled(admin, source["id"])["status"] == "imported"
    again = scrape(rest_url) - after
    assert again("ingestion_messages_fetched_total", provider=PROVIDER) == SPAM_COUNT
    assert again("ingestion_messages_already_present_total", provider=PROVIDER) == SPAM_COUNT
    assert again("ingestion_messages_archived_total", provider=PROVIDER) == 0
    assert again("ingestion_archived_bytes_total", provider=PROVIDER) == 0

    # The server's own listener serves the same numbers as Envoy's /metrics.
    direct = scrape(f"http://127.0.0.1:{grpc_server.metrics_port}")
    assert direct.value("ingestion_messages_archived_total", provider=PROVIDER) == scrape(
        rest_url
    ).value("ingestion_messages_archived_total", provider=PROVIDER)


def test_rpcs_are_counted_by_status_code(admin: Rest, rest_url: str) -> None:
    before = scrape(rest_url)
    missing = admin.get(f"/v1/ingestion-sources/{uuid.uuid4()}")
    assert missing.status_code == 404
    unauthenticated = requests.get(f"{rest_url}/v1/ingestion-sources/x", timeout=10)
    assert unauthenticated.status_code == 401
    delta = scrape(rest_url) - before
    get = "GetIngestionSource"
    assert delta("grpc_server_handled_total", grpc_method=get, grpc_code="NOT_FOUND") == 1
    assert delta("grpc_server_handled_total", grpc_method=get, grpc_code="UNAUTHENTICATED") == 1
    assert delta("grpc_server_started_total", grpc_method=get) == 2
    assert delta("grpc_server_handling_seconds_count", grpc_method=get) == 2


def test_only_get_metrics_bypasses_the_api(rest_url: str) -> None:
    # Anything else on /metrics is still the REST API's: an unknown method.
    response = requests.post(f"{rest_url}/metrics", timeout=10)
    assert response.status_code == 404
    assert response.json()["code"] == 5
