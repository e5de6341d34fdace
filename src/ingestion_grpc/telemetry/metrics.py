"""Every Prometheus metric of the service, by name, in one place.

Each process (the server, every worker process, the scheduler) updates its own
values; in multiprocess mode (`exposition.enable_multiprocess`) they live in
files under PROMETHEUS_MULTIPROC_DIR and the server's `GET /metrics` adds them
up. Labels are low-cardinality on purpose: a provider's name, an RPC method, an
outcome; never a source, run or mailbox id (those are in the logs). The names
and what they count are listed in docs/operations.md.

Every metric has labels, so no value exists before its first use: values made
before multiprocess mode is switched on would not be seen by `/metrics`.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram
from prometheus_client.metrics import MetricWrapperBase

# Seconds, from a fast RPC or batch write to a long one.
_SHORT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Seconds, from a job or a mailbox that ends at once to one that runs for an hour.
_LONG_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)

# --- RPCs (api/metrics.py), named as go-grpc-prometheus names them ----------------------

_RPC_LABELS = ["grpc_service", "grpc_method", "grpc_type"]
RPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _RPC_LABELS)
RPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    [*_RPC_LABELS, "grpc_code"],
)
RPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from an RPC's start until its last response message was sent.",
    _RPC_LABELS,
    buckets=_SHORT_BUCKETS,
)

# --- messages (engine/mailboxes.py), counted once per committed batch -------------------

MESSAGES_FETCHED = Counter(
    "ingestion_messages_fetched_total", "Messages read from providers.", ["provider"]
)
MESSAGES_ARCHIVED = Counter(
    "ingestion_messages_archived_total", "Messages newly added to the archive.", ["provider"]
)
MESSAGES_ALREADY_PRESENT = Counter(
    "ingestion_messages_already_present_total",
    "Messages whose exact bytes the archive held already.",
    ["provider"],
)
MESSAGES_SKIPPED = Counter(
    "ingestion_messages_skipped_total",
    "Messages gone from the source before they could be fetched.",
    ["provider"],
)
MESSAGES_FAILED = Counter(
    "ingestion_messages_failed_total",
    "Messages that could not be fetched for now (fetched again next run).",
    ["provider"],
)
ARCHIVED_BYTES = Counter(
    "ingestion_archived_bytes_total",
    "Bytes of the messages newly added to the archive.",
    ["provider"],
)
MAILBOX_RUNS = Histogram(
    "ingestion_mailbox_run_seconds",
    "Time a worker spent on one mailbox of a run until it stopped, by how it stopped: "
    "done, failed, skipped, paused, requeued (its time slice ended), lost_lease, retry.",
    ["provider", "outcome"],
    buckets=_LONG_BUCKETS,
)

# --- providers' API calls (providers/retries.py) -----------------------------------------

PROVIDER_REQUESTS = Counter(
    "ingestion_provider_requests_total",
    "Attempts of cloud provider API calls (each one request).",
    ["provider"],
)
PROVIDER_RETRIES = Counter(
    "ingestion_provider_retries_total",
    "Provider API attempts that failed in a way worth retrying (throttling, 5xx, network).",
    ["provider"],
)
PROVIDER_THROTTLED = Counter(
    "ingestion_provider_throttled_total",
    "Provider API attempts refused as too many (HTTP 429, Gmail's rate-limit 403).",
    ["provider"],
)

# --- jobs (jobs/metrics.py) ---------------------------------------------------------------

JOB_SECONDS = Histogram(
    "ingestion_job_seconds",
    "Time a worker spent on one job, by actor and outcome (ok, error, skipped).",
    ["actor", "outcome"],
    buckets=_LONG_BUCKETS,
)
JOB_WAIT_SECONDS = Histogram(
    "ingestion_job_wait_seconds",
    "Time a job waited in the queue, from when it was due until a worker started it.",
    ["actor"],
    buckets=_LONG_BUCKETS,
)

# --- the blob store (archive/blobstore.py) ------------------------------------------------

BLOB_WRITE_SECONDS = Histogram(
    "ingestion_blob_write_seconds",
    "Time to store one batch of message blobs durably.",
    ["store"],
    buckets=_SHORT_BUCKETS,
)

ALL: tuple[MetricWrapperBase, ...] = (
    RPC_STARTED,
    RPC_HANDLED,
    RPC_SECONDS,
    MESSAGES_FETCHED,
    MESSAGES_ARCHIVED,
    MESSAGES_ALREADY_PRESENT,
    MESSAGES_SKIPPED,
    MESSAGES_FAILED,
    ARCHIVED_BYTES,
    MAILBOX_RUNS,
    PROVIDER_REQUESTS,
    PROVIDER_RETRIES,
    PROVIDER_THROTTLED,
    JOB_SECONDS,
    JOB_WAIT_SECONDS,
    BLOB_WRITE_SECONDS,
)

# Gauges made at scrape time by the server (exposition.py), not by this module.
QUEUE_MESSAGES = "ingestion_queue_messages"


def count_batch(
    provider: str,
    *,
    fetched: int,
    archived: int,
    already_present: int,
    skipped: int,
    failed: int,
    archived_bytes: int,
) -> None:
    """One committed batch of a mailbox: a handful of increments, whatever its size."""
    for metric, amount in (
        (MESSAGES_FETCHED, fetched),
        (MESSAGES_ARCHIVED, archived),
        (MESSAGES_ALREADY_PRESENT, already_present),
        (MESSAGES_SKIPPED, skipped),
        (MESSAGES_FAILED, failed),
        (ARCHIVED_BYTES, archived_bytes),
    ):
        # A zero is still written: the series exists from the provider's first batch.
        metric.labels(provider).inc(amount)
