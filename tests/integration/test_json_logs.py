"""LOG_FORMAT=json: one JSON object a line, saying which request, source, run and
mailbox it is about, in the server (this process) and in a real worker process;
and no credential in any of them."""

from __future__ import annotations

import io
import json
import logging
import shutil
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingestion_grpc.config import Settings
from ingestion_grpc.telemetry.logs import ContextFilter, JsonFormatter
from tests.integration.test_validation_rest import GOOGLE_CONFIG
from tests.support.polling import wait_for
from tests.support.rest import Rest
from tests.support.sources import create_source, latest_run, settled
from tests.support.workers import Worker

BASE_FIELDS = {"time", "level", "logger", "message", "pid"}
MESSAGE = b"From: a@example.com\r\nSubject: %d\r\nMessage-ID: <%d@example.com>\r\n\r\nbody\r\n"


@pytest.fixture
def server_json_lines() -> Iterator[io.StringIO]:
    """What the in-process server logs meanwhile, formatted as LOG_FORMAT=json does."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def parsed(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # each line is one object
    for entry in entries:
        assert set(entry) >= BASE_FIELDS, entry
        assert entry["time"].endswith("Z")
    return entries


@pytest.fixture
def import_folder(settings: Settings) -> Iterator[Path]:
    folder = settings.import_root / uuid.uuid4().hex[:12]
    folder.mkdir(parents=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_server_lines_carry_the_request_id_and_never_a_secret(
    admin: Rest,
    server_json_lines: io.StringIO,
    settings: Settings,
    import_folder: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    mbox = import_folder / "one.mbox"
    mbox.write_bytes(b"From x\n" + MESSAGE % (1, 1))
    config = {"localFilePath": mbox.relative_to(settings.import_root).as_posix()}
    created = admin.post(
        "/v1/ingestion-sources",
        json={"name": "logs", "provider": "mbox_import", "providerConfig": config},
    )
    assert created.status_code == 201, created.text
    # No worker takes its import here: paused, the queued job does nothing later.
    assert admin.post(f"/v1/ingestion-sources/{created.json()['id']}/pause").status_code == 200
    refused = admin.post(
        "/v1/ingestion-sources",
        json={"name": "g", "provider": "google_workspace", "providerConfig": GOOGLE_CONFIG},
    )
    assert refused.status_code == 400

    text = server_json_lines.getvalue()
    assert "TOP-SECRET-KEY-MATERIAL" not in text
    entries = parsed(text)
    creation = [e for e in entries if "created by user" in e["message"]]
    assert len(creation) == 1
    assert creation[0]["logger"] == "ingestion_grpc.domain.sources"
    assert created.json()["id"] in creation[0]["message"]
    # The request id is Envoy's: its access log line for the same request has it.
    request_id = creation[0]["request_id"]
    base = tmp_path_factory.getbasetemp()
    access_line = wait_for(
        lambda: next((line for line in envoy_log_lines(base) if request_id in line), None),
        lambda line: line is not None,
        timeout=10,
        what="Envoy's access log line of the request",
    )
    assert '"POST /v1/ingestion-sources HTTP/1.1" 201' in str(access_line)


def envoy_log_lines(base: Path) -> list[str]:
    return [
        line
        for path in base.rglob("envoy-*.log")
        for line in path.read_text(errors="replace").splitlines()
    ]


def test_worker_lines_name_the_source_run_and_mailbox(
    admin: Rest,
    environment: dict[str, str],
    settings: Settings,
    import_folder: Path,
    tmp_path: Path,
) -> None:
    archive = import_folder / "mail.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("one.eml", MESSAGE % (1, 1))
        bundle.writestr("two.eml", MESSAGE % (2, 2))
        bundle.writestr("notes.txt", b"not a message")  # skipped, with a warning
    worker = Worker({**environment, "LOG_FORMAT": "json"}, tmp_path / "json-worker.log").start()
    try:
        source = create_source(
            admin,
            "json logs",
            "eml_import",
            {"localFilePath": archive.relative_to(settings.import_root).as_posix()},
        )
        assert settled(admin, source["id"])["status"] == "imported"
    finally:
        worker.stop()
    run = latest_run(admin, source["id"])

    # Dramatiq's supervisor (the parent process) keeps its own format for its
    # few start and stop lines; everything the worker process logs is JSON.
    ours = [line for line in worker.log().splitlines() if line.startswith("{")]
    entries = parsed("\n".join(ours))
    # The worker shares the run's queue with other tests' leftovers: pick this
    # source's line by its text, then check the context it carries.
    listed = [
        e for e in entries if "mailboxes listed" in e["message"] and source["id"] in e["message"]
    ]
    assert listed and listed[0]["source_id"] == source["id"]
    assert listed[0]["run_id"] == run["id"]
    # Logged by the provider in the engine's read-ahead thread: the context follows.
    skipped = [
        e for e in entries if "skipped 'notes.txt'" in e["message"] and e.get("run_id") == run["id"]
    ]
    assert skipped, entries
    assert skipped[0]["level"] == "WARNING"
    assert (skipped[0]["source_id"], skipped[0]["run_id"]) == (source["id"], run["id"])
    assert skipped[0]["mailbox"] == "mail.zip"
    assert skipped[0]["provider"] == "eml_import"
