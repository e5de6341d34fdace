"""The example clients in examples/go and examples/ts, built on the generated stubs
(gen/go, gen/ts), against the live stack: each signs in over native gRPC through
Envoy, creates an API key, imports the SpamAssassin spam mbox from IMPORT_ROOT,
follows the run and lists the archive. The counts they print must be the corpus's.

Go is built in GOPATH mode from Debian's packages (golang-go, golang-google-grpc-dev,
golang-google-protobuf-dev), the TypeScript client with the project's npm packages
(./node_modules, `npm ci`). This test installs nothing: `.ci/run` and `make test`
do (`make example-tools`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from ingestion_grpc.config import Settings
from tests.support.corpora import SPAM
from tests.support.services import ADMIN_EMAIL, ADMIN_PASSWORD
from tests.support.workers import Worker

ROOT = Path(__file__).resolve().parents[2]
GO_EXAMPLE = ROOT / "examples" / "go"
TS_EXAMPLE = ROOT / "examples" / "ts"
GEN_GO = ROOT / "gen" / "go"
GO_MODULE = "example.com/ingestion-grpc/gen/go"
DEBIAN_GOPATH = Path("/usr/share/gocode")
SERVICE_CONFIG = ROOT / "proto" / "ingestion" / "v1" / "ingestion_service_config.json"
NODE_MODULES = ROOT / "node_modules"
SPAM_COUNT = 500
BUILD_TIMEOUT = 300
RUN_TIMEOUT = 300


def missing(what: str) -> NoReturn:
    pytest.fail(f"{what} is not installed; `make example-tools` (or .ci/run) installs it")


@pytest.fixture
def mbox(settings: Settings, start_worker: Callable[[], Worker]) -> Iterator[str]:
    """The spam mbox in a folder of IMPORT_ROOT, as a path relative to it; a worker."""
    folder = settings.import_root / f"examples-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    shutil.copyfile(SPAM, folder / SPAM.name)
    start_worker()
    yield (folder / SPAM.name).relative_to(settings.import_root).as_posix()
    shutil.rmtree(folder, ignore_errors=True)


def assert_counts(output: str, name: str) -> None:
    """The client saw the import complete with every message, and listed them all."""
    run = re.search(r"^run: import completed fetched=(\d+) archived=(\d+) ", output, re.M)
    assert run is not None, output
    assert (int(run[1]), int(run[2])) == (SPAM_COUNT, SPAM_COUNT), output
    listed = re.search(r"^archived: listed=(\d+) total=(\d+)$", output, re.M)
    assert listed is not None, output
    assert (int(listed[1]), int(listed[2])) == (SPAM_COUNT, SPAM_COUNT), output
    assert f"signed in as {ADMIN_EMAIL} (admin)" in output
    assert re.search(r"^source: \S+ imported: Imported: 500 new messages", output, re.M), output
    assert re.search(r"^sources visible: [1-9]\d*$", output, re.M), f"{name}: {output}"


def go_cache(tmp_path: Path) -> dict[str, str]:
    """Go's build cache: its default (kept between runs: grpc builds once) unless
    there is no home to put it in."""
    if any(name in os.environ for name in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
        return {}
    return {"GOCACHE": str(tmp_path / "go-cache")}


def run_client(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        command,
        cwd=cwd,
        env={**os.environ, **env, "INGESTION_PASSWORD": ADMIN_PASSWORD},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert result.returncode == 0, f"{command[0]} exited {result.returncode}:\n{result.stderr}"
    return result.stdout


def test_go_example_client_imports_an_mbox(rest_url: str, mbox: str, tmp_path: Path) -> None:
    go = shutil.which("go")
    if go is None:
        missing("Go (golang-go)")
    for package in ("google.golang.org/grpc", "google.golang.org/protobuf"):
        if not (DEBIAN_GOPATH / "src" / package).is_dir():
            missing(f"{package} (golang-google-grpc-dev, golang-google-protobuf-dev)")
    # GOPATH mode: the generated stubs are the package at their import path.
    gopath = tmp_path / "gopath"
    (gopath / "src" / GO_MODULE).parent.mkdir(parents=True)
    (gopath / "src" / GO_MODULE).symlink_to(GEN_GO)
    binary = tmp_path / "example"
    subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=GO_EXAMPLE,
        env={
            **os.environ,
            **go_cache(tmp_path),
            "GOPATH": f"{gopath}:{DEBIAN_GOPATH}",
            "GO111MODULE": "off",
        },
        check=True,
        timeout=BUILD_TIMEOUT,
    )
    output = run_client(
        [
            str(binary),
            "-addr",
            rest_url.removeprefix("http://"),
            "-email",
            ADMIN_EMAIL,
            "-mbox",
            mbox,
            "-service-config",
            str(SERVICE_CONFIG),
        ],
        GO_EXAMPLE,
        # grpc-go 1.33 applies the service config's retry policies only when asked.
        {"GRPC_GO_RETRY": "on"},
    )
    assert f"service config: {SERVICE_CONFIG}" in output
    assert_counts(output, "go")


def test_ts_example_client_imports_an_mbox(rest_url: str, mbox: str) -> None:
    node = shutil.which("node")
    if node is None:
        missing("Node.js (nodejs)")
    tsc = NODE_MODULES / ".bin" / "tsc"
    if not tsc.is_file() or not (NODE_MODULES / "@connectrpc" / "connect-node").is_dir():
        missing("the npm packages (npm ci)")
    subprocess.run([node, str(tsc), "-p", str(TS_EXAMPLE)], check=True, timeout=BUILD_TIMEOUT)
    output = run_client(
        [
            node,
            str(TS_EXAMPLE / "dist" / "main.js"),
            "--addr",
            rest_url.removeprefix("http://"),
            "--email",
            ADMIN_EMAIL,
            "--mbox",
            mbox,
        ],
        TS_EXAMPLE,
        {},
    )
    assert_counts(output, "ts")
