"""A real S3-protocol server for tests and benchmarks: moto's server, in a process
of its own, on a free port (started by `moto_main.py`: moto's `moto_server`, less
per-request costs that are not S3's).

`s3_server()` is a context manager usable anywhere (tests, bench scripts, a
two-node test); the `s3` fixture is one server for the whole session. Each user
makes a bucket of its own with `S3Server.new_archive()`, which gives the
ARCHIVE_URL and the environment a server or worker needs to use it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ingestion_grpc.archive.s3 import S3BlobStore, s3_client
from tests.support.envoy import HOST, free_port

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

START_TIMEOUT = 20.0
START_ATTEMPTS = 3

# Dummy credentials and region: moto accepts any; the variables are boto3's own,
# so the service's standard credential chain reads them like real ones.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test-access-key",
    "AWS_SECRET_ACCESS_KEY": "test-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# A real machine's ~/.aws files must not leak into the tests (or the reverse).
ISOLATION = {"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class S3Archive:
    """A bucket on the test server, as the service is configured to use it."""

    bucket: str
    prefix: str
    endpoint_url: str
    # For this process (boto3 clients are thread-safe and slow to make).
    client: S3Client = field(repr=False, compare=False)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def store(self) -> S3BlobStore:
        """A store on this bucket for the test's own process."""
        return S3BlobStore(self.bucket, self.prefix, client=self.client)

    @property
    def environment(self) -> dict[str, str]:
        """ARCHIVE_URL, S3_ENDPOINT_URL and the AWS variables, for a process's env."""
        return {
            **CREDENTIALS,
            **ISOLATION,
            "ARCHIVE_URL": self.url,
            "S3_ENDPOINT_URL": self.endpoint_url,
        }


@dataclass
class S3Server:
    endpoint_url: str
    process: subprocess.Popen[bytes]

    @functools.cached_property
    def client(self) -> S3Client:
        """A client of this process, with the dummy credentials."""
        with credentials_in_environment():
            return s3_client(self.endpoint_url)

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far (Linux), for benchmarks:
        how much of an S3 import's time went to moto itself."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def new_archive(self, prefix: str = "archive") -> S3Archive:
        """A new, empty bucket of its own."""
        bucket = f"test-{uuid.uuid4().hex[:16]}"
        self.client.create_bucket(Bucket=bucket)
        return S3Archive(bucket, prefix, self.endpoint_url, self.client)


@contextlib.contextmanager
def credentials_in_environment() -> Iterator[None]:
    """The dummy credentials in os.environ, for boto3 clients made in this process."""
    saved = {name: os.environ.get(name) for name in (*CREDENTIALS, *ISOLATION)}
    os.environ.update({**CREDENTIALS, **ISOLATION})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _moto_server_command(port: int) -> list[str]:
    # moto's own `moto_server`, less its per-request costs that are not S3's.
    return [sys.executable, str(Path(__file__).with_name("moto_main.py")), HOST, str(port)]


def _answers(url: str) -> bool:
    try:
        with _DIRECT.open(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer: the server is up
    except OSError:
        return False


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """Start `moto_server` on a free port; stop it (and only it) on exit."""
    with tempfile.TemporaryFile() as log:
        for _attempt in range(START_ATTEMPTS):
            port = free_port()
            process = subprocess.Popen(
                _moto_server_command(port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **CREDENTIALS, **ISOLATION},
            )
            url = f"http://{HOST}:{port}"
            deadline = time.monotonic() + START_TIMEOUT
            while process.poll() is None and time.monotonic() < deadline:
                if _answers(url):
                    break
                time.sleep(0.1)
            if process.poll() is None and _answers(url):
                break
            _stop(process)  # the port was taken meanwhile, or it hung: try another
        else:
            log.seek(0)
            raise RuntimeError(f"moto_server did not start: {log.read()[-2000:]!r}")
        try:
            yield S3Server(url, process)
        finally:
            _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """One S3-protocol server for the session (started only if a test asks)."""
    with s3_server() as server:
        yield server


@pytest.fixture
def s3_archive(s3: S3Server) -> S3Archive:
    """A new bucket on the session's S3 server."""
    return s3.new_archive()
