"""The client commands run as a user runs them: `.venv/bin/ingestion-grpc ...` in a
subprocess, against the live test server through Envoy, with output to a pipe;
what they print and their exit codes (0 done, 1 the run failed, 2 bad usage)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ingestion_grpc.config import Settings
from tests.support.corpora import HAM, SPAM, mbox_messages
from tests.support.fake_tenant import FakeTenantServer
from tests.support.rest import Rest
from tests.support.sources import archived, latest_run
from tests.support.workers import Worker

CLI = str(Path(sys.executable).parent / "ingestion-grpc")
SPAM_COUNT = 500


@dataclass
class Cli:
    """`ingestion-grpc` as a shell user with INGESTION_URL / INGESTION_API_KEY set."""

    environment: dict[str, str]
    cwd: Path

    def __call__(self, *args: str, **overrides: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CLI, *args],
            env={**self.environment, **overrides},
            cwd=self.cwd,
            capture_output=True,  # a pipe: plain lines, no progress bars
            text=True,
            timeout=240,
            check=False,
        )


@pytest.fixture(scope="module")
def api_key(admin: Rest) -> str:
    response = admin.post("/v1/api-keys", json={"name": "cli tests", "expiresInDays": 1})
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


@pytest.fixture
def cli(rest_url: str, api_key: str, tmp_path: Path) -> Cli:
    environment = {
        name: value
        for name, value in os.environ.items()
        # Rich would draw for a terminal with these set, whatever stdout is.
        if name not in {"FORCE_COLOR", "TTY_COMPATIBLE", "INGESTION_URL", "INGESTION_API_KEY"}
    }
    environment |= {"INGESTION_URL": rest_url, "INGESTION_API_KEY": api_key}
    return Cli(environment, tmp_path)


@pytest.fixture
def worker(start_worker: Callable[[], Worker]) -> Worker:
    return start_worker()


def source_id_in(output: str) -> str:
    match = re.search(r"created source ([0-9a-f-]{36}) ", output)
    assert match, output
    return match.group(1)


def test_import_file_uploads_imports_and_reports_the_run(
    cli: Cli, admin: Rest, worker: Worker, tmp_path: Path, settings: Settings
) -> None:
    mbox = tmp_path / "spam.mbox"
    shutil.copyfile(SPAM, mbox)
    # Other tests' uploads may be there (unused ones go only after UPLOAD_TTL).
    uploads_before = set(settings.upload_root.glob("*.upload"))
    done = cli("import-file", str(mbox), "--name", "Spam from the CLI")
    assert done.returncode == 0, done.stderr + done.stdout
    lines = done.stdout.splitlines()
    assert lines[0] == f"uploading spam.mbox ({mbox.stat().st_size} bytes) as mbox_import"
    assert lines[1] == "uploaded spam.mbox"
    source_id = source_id_in(done.stdout)
    assert lines[2] == f"created source {source_id} (mbox_import): importing"
    assert re.fullmatch(rf"run [0-9a-f-]{{36}} \(import\) of source {source_id}: running", lines[3])
    assert re.fullmatch(
        r"completed: 500 archived, 0 already present, 0 skipped, 0 failed; "
        r"1 of 1 mailboxes done in \d+\.\ds",
        lines[-1],
    ), lines
    assert done.stderr == ""
    assert len(archived(admin, source_id)) == SPAM_COUNT
    # Imported, so the upload is gone from the server's disk.
    assert set(settings.upload_root.glob("*.upload")) - uploads_before == set()

    listed = cli("sources", "list")
    assert listed.returncode == 0
    row = next(line for line in listed.stdout.splitlines() if line.startswith(source_id))
    fields = row.split("\t")
    assert fields[1:4] == ["Spam from the CLI", "mbox_import", "imported"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", fields[4])

    shown = cli("sources", "show", source_id)
    assert shown.returncode == 0
    assert "status: imported" in shown.stdout.splitlines()
    assert "latest run: " in shown.stdout and "completed: 500 archived" in shown.stdout
    as_json = json.loads(cli("sources", "show", source_id, "--json").stdout)
    assert as_json["status"] == "imported"
    assert as_json["latestRun"]["messagesArchived"] == SPAM_COUNT
    assert "providerConfig" not in as_json

    # The run is over: watch says how it ended, and so does its exit code.
    watched = cli("sources", "watch", source_id)
    assert watched.returncode == 0
    assert watched.stdout.splitlines()[-1].startswith("completed: 500 archived")

    # A sync of a file source is refused by the service: the command was wrong.
    refused = cli("sources", "sync", source_id)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: ")


def test_the_file_type_is_told_by_content_not_by_name(
    cli: Cli, worker: Worker, tmp_path: Path
) -> None:
    # An mbox named .pst is imported as an mbox; it has 3 messages of the ham corpus.
    misnamed = tmp_path / "mail.pst"
    with misnamed.open("wb") as out:
        for raw in mbox_messages(HAM)[:3]:
            out.write(b"From sender@example.com Thu Jan  1 00:00:00 2004\n" + raw + b"\n")
    done = cli("import-file", str(misnamed), "--no-wait")
    assert done.returncode == 0, done.stderr
    assert f"uploading mail.pst ({misnamed.stat().st_size} bytes) as mbox_import" in done.stdout
    assert "created source" in done.stdout and "run " not in done.stdout

    watched = cli("sources", "watch", source_id_in(done.stdout))
    assert watched.returncode == 0, watched.stdout
    assert watched.stdout.splitlines()[-1].startswith("completed: 3 archived")


def test_a_run_that_fails_exits_1_and_says_why(
    cli: Cli, admin: Rest, worker: Worker, tmp_path: Path
) -> None:
    # A PST's magic number and nothing a PST reader can open: accepted, then failed.
    broken = tmp_path / "broken.pst"
    broken.write_bytes(b"!BDN" + bytes(4092))
    failed = cli("import-file", str(broken))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "as pst_import" in failed.stdout
    last = failed.stdout.splitlines()[-1]
    assert last.startswith("failed: "), failed.stdout
    source_id = source_id_in(failed.stdout)
    assert latest_run(admin, source_id)["status"] == "failed"
    assert cli("sources", "watch", source_id).returncode == 1


def test_bad_usage_exits_2_with_one_line_on_stderr(cli: Cli, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("Dear diary,\n")
    cases = {
        "no such file": cli("import-file", str(tmp_path / "missing.mbox")),
        "not a file": cli("import-file", str(tmp_path)),
        "neither a PST file, a zip of .eml files nor an mbox file": cli("import-file", str(text)),
        "not found": cli("sources", "show", str(uuid.uuid4())),
        "no API key": cli("sources", "list", INGESTION_API_KEY=""),
        "the API key was refused": cli("sources", "list", "--api-key", "not-a-key"),
        "--url must be a service address": cli("sources", "list", "--url", "ftp://x/y"),
        "--config: not valid JSON": cli(
            "sources", "create", "--name", "x", "--provider", "mbox_import", "--config", "{"
        ),
    }
    for expected, result in cases.items():
        assert result.returncode == 2, (expected, result.stdout, result.stderr)
        assert result.stdout == "", expected
        assert result.stderr.startswith("error: ") and expected in result.stderr, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
    # argparse's own usage errors use the same status.
    assert cli("sources", "frobnicate").returncode == 2
    assert cli("sources", "show").returncode == 2


def test_a_service_that_cannot_be_reached_exits_1(cli: Cli) -> None:
    with_no_service = cli("sources", "list", "--url", "http://127.0.0.1:9")
    assert with_no_service.returncode == 1
    assert "unavailable" in with_no_service.stderr


@pytest.fixture
def tenant() -> Iterator[FakeTenantServer]:
    server = FakeTenantServer(latency=0.02).start()
    yield server
    server.stop()


def test_a_tenant_is_followed_mailbox_by_mailbox_and_driven(
    cli: Cli, worker: Worker, tenant: FakeTenantServer, tmp_path: Path
) -> None:
    ham = mbox_messages(HAM)
    prefix = uuid.uuid4().hex[:6]
    for number in range(3):
        user = tenant.add_user(f"{prefix}-{number}", f"user{number}@tenant.test")
        for index in range(10):
            user.messages[f"m{index:03d}"] = (ham[number * 10 + index], ["Inbox"])
    tenant.add_user(f"{prefix}-guest", "guest@tenant.test", skip="no mailbox licence")
    config = tmp_path / "tenant.json"
    config.write_text(json.dumps({"endpoint": tenant.url}))

    created = cli(
        "sources", "create", "--name", "Tenant", "--provider", "fake_tenant",
        "--config-file", str(config), "--watch",
    )  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr
    lines = created.stdout.splitlines()
    source_id = source_id_in(created.stdout)
    for number in range(3):
        assert (
            f"mailbox user{number}@tenant.test: done (10 archived, 0 already present, 0 failed)"
            in lines
        ), lines
    assert any(
        line.startswith("mailbox guest@tenant.test: skipped: no mailbox licence") for line in lines
    )
    assert lines[-1].startswith("completed: 30 archived, 0 already present, 0 skipped, 0 failed; ")
    assert "3 of 4 mailboxes done" in lines[-1]

    synced = cli("sources", "sync", source_id, "--watch")
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert re.match(rf"sync [0-9a-f-]{{36}} of source {source_id} started", synced.stdout)
    assert synced.stdout.splitlines()[-1].startswith("completed: 0 archived")

    paused = cli("sources", "pause", source_id)
    assert (paused.returncode, paused.stdout) == (0, f"source {source_id}: paused\n")
    assert cli("sources", "sync", source_id).returncode == 1  # 409: paused
    resumed = cli("sources", "resume", source_id)
    assert (resumed.returncode, resumed.stdout) == (0, f"source {source_id}: active\n")


def test_on_a_terminal_progress_is_drawn_and_the_result_is_the_same(
    cli: Cli, worker: Worker, tmp_path: Path
) -> None:
    mbox = tmp_path / "five.mbox"
    with mbox.open("wb") as out:
        for raw in mbox_messages(SPAM)[:5]:
            out.write(b"From sender@example.com Thu Jan  1 00:00:00 2004\n" + raw + b"\n")
    # FORCE_COLOR makes rich draw as for a terminal although stdout is a pipe.
    drawn = cli("import-file", str(mbox), FORCE_COLOR="1", COLUMNS="120")
    assert drawn.returncode == 0, drawn.stdout + drawn.stderr
    assert "\x1b[" in drawn.stdout  # rich's escape sequences: bars, not plain lines
    assert "completed: 5 archived" in drawn.stdout
    table = cli("sources", "list", FORCE_COLOR="1", COLUMNS="200")
    assert table.returncode == 0 and "PROVIDER" in table.stdout
