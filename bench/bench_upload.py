"""Upload benchmark: a multi-gigabyte `POST /v1/upload` through Envoy.

What runs (all on this machine):

- a PostgreSQL database and a Redis namespace of this run's own (dropped / cleaned
  at the end);
- the gRPC server as a SUBPROCESS (`python -m ingestion_grpc.server`), so that its
  memory can be measured apart from this client's, and Envoy in front of it;
- this process as the client: `requests` with a generator body, so the upload is
  sent with chunked transfer encoding as it is generated and never held whole
  (`--client grpc`: a native gRPC UploadFile stream of 1 MiB HttpBody messages,
  also through Envoy).

Timed: the one `POST /v1/upload` of `--size` bytes (default 2 GiB), from the first
byte sent to the `201 {"filePath": ...}`. The stored file's SHA-256 must equal the
SHA-256 of what was sent, or the run fails. Printed: MB/s, and the peak RSS of
Envoy and of the server process (VmHWM, which the kernel keeps; cross-checked by
sampling VmRSS every 50 ms; VmHWM is reset just before the upload, so start-up does
not count), next to their RSS before the upload. A streaming path keeps both flat;
one that buffered the body would grow by the size of the upload.

    .venv/bin/python bench/bench_upload.py                 # 2 GiB
    .venv/bin/python bench/bench_upload.py --size 5G
    .venv/bin/python bench/bench_upload.py --size 3G --limit 1G   # expect 413, no file
    .venv/bin/python bench/bench_upload.py --client grpc           # native gRPC client

`make bench-upload SIZE=3G` does the same. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `tests.support`

import grpc
import psycopg
import redis
import requests
from google.api import httpbody_pb2
from ingestion.v1 import upload_service_pb2_grpc

from ingestion_grpc.config import parse_size
from tests.support.envoy import EnvoyProxy, free_port, start_envoy

POSTGRES_ADMIN_URL = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_EMAIL = "bench-admin@example.com"
MB = 1_000_000
MIB = 1024 * 1024
SAMPLE_SECONDS = 0.05


class BenchFailed(Exception):
    """The benchmark could not produce a trustworthy figure."""


# -- memory -------------------------------------------------------------------------------


def status_kib(pid: int, field_name: str) -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM); 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak is the upload's own
    and not, say, the server's start-up (migrations)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


@dataclass
class RssSampler:
    """Samples VmRSS of some processes until stopped; keeps each one's peak."""

    pids: dict[str, int]
    peaks: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                self.peaks[name] = max(self.peaks.get(name, 0), status_kib(pid, "VmRSS"))
            self._stop.wait(SAMPLE_SECONDS)


# -- the stack ----------------------------------------------------------------------------


@dataclass
class Stack:
    """Database, Redis namespace, server subprocess and Envoy of one run."""

    workdir: Path
    max_upload: str
    database_name: str = field(default_factory=lambda: f"bench_upload_{uuid.uuid4().hex[:12]}")
    namespace: str = field(default_factory=lambda: f"bench-upload-{uuid.uuid4().hex[:12]}")
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    server: subprocess.Popen[bytes] | None = None
    envoy: EnvoyProxy | None = None

    @property
    def upload_root(self) -> Path:
        return self.workdir / "data" / "uploads"

    @property
    def base_url(self) -> str:
        assert self.envoy is not None
        return self.envoy.base_url

    def start(self) -> None:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{self.database_name}"')
        base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
        grpc_port = free_port()
        environment = {
            **os.environ,
            "DATA_DIR": str(self.workdir / "data"),
            "DATABASE_URL": f"{base}/{self.database_name}",
            "REDIS_URL": REDIS_URL,
            "QUEUE_NAMESPACE": self.namespace,
            "JWT_SECRET": secrets.token_urlsafe(32),
            "ENCRYPTION_KEY": secrets.token_hex(32),
            "GRPC_PORT": str(grpc_port),
            "ADMIN_EMAIL": ADMIN_EMAIL,
            "ADMIN_PASSWORD": self.admin_password,
            "MAX_UPLOAD_BYTES": self.max_upload,
            "LOG_LEVEL": "WARNING",
        }
        log = (self.workdir / "server.log").open("wb")
        self.server = subprocess.Popen(
            [sys.executable, "-m", "ingestion_grpc.server"],
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.envoy = start_envoy(grpc_port, self.workdir / "envoy")
        try:
            self.envoy.wait_healthy(timeout=60)
        except TimeoutError as exc:
            raise BenchFailed(f"server not healthy:\n{self.server_log()}") from exc

    def token(self) -> str:
        response = requests.post(
            f"{self.base_url}/v1/auth/login",
            json={"email": ADMIN_EMAIL, "password": self.admin_password},
            timeout=30,
        )
        response.raise_for_status()
        token: str = response.json()["accessToken"]
        return token

    def server_log(self) -> str:
        path = self.workdir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.envoy is not None:
            self.envoy.stop()
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(15)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.database_name}" WITH (FORCE)')
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"{self.namespace}:*"):
            client.delete(key)
        client.close()


@contextlib.contextmanager
def running_stack(workdir: Path, max_upload: str) -> Iterator[Stack]:
    stack = Stack(workdir, max_upload)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


# -- the upload ---------------------------------------------------------------------------


@dataclass
class Body:
    """`size` bytes in `chunk`-sized pieces, hashed as they are handed out.

    One random block, each copy stamped with its index so no two pieces are equal.
    """

    size: int
    chunk: int
    sent: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)

    def __iter__(self) -> Iterator[bytes]:
        block = os.urandom(self.chunk)
        index = 0
        while self.sent < self.size:
            piece = (index.to_bytes(8, "big") + block[8:])[: self.size - self.sent]
            self.digest.update(piece)
            self.sent += len(piece)
            index += 1
            yield piece


@dataclass
class Result:
    answer: str  # the HTTP status, or the gRPC status code's name
    detail: str  # the response body, or the gRPC status message
    file_path: str | None
    sent: int
    seconds: float
    peaks_kib: dict[str, int]
    sampled_kib: dict[str, int]
    before_kib: dict[str, int]

    @property
    def mb_per_s(self) -> float:
        return self.sent / MB / self.seconds


def _post_rest(stack: Stack, token: str, body: Body) -> tuple[str, str, str | None]:
    with requests.Session() as session:
        session.trust_env = False  # straight to Envoy, whatever http_proxy says
        response = session.post(
            f"{stack.base_url}/v1/upload",
            data=iter(body),
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/octet-stream",
            },
            timeout=600,
        )
    file_path = response.json().get("filePath") if response.status_code == 201 else None
    return str(response.status_code), response.text, file_path


def _call_grpc(stack: Stack, token: str, body: Body) -> tuple[str, str, str | None]:
    def messages() -> Iterator[httpbody_pb2.HttpBody]:
        content_type = "application/octet-stream"
        for piece in body:
            yield httpbody_pb2.HttpBody(content_type=content_type, data=piece)
            content_type = ""

    assert stack.envoy is not None
    with grpc.insecure_channel(stack.envoy.grpc_target) as channel:
        stub = upload_service_pb2_grpc.UploadServiceStub(channel)
        try:
            response = stub.UploadFile(
                messages(), metadata=(("authorization", f"Bearer {token}"),), timeout=600
            )
        except grpc.RpcError as error:
            return error.code().name, error.details() or "", None
    return "OK", "", response.file_path


def upload(stack: Stack, size: int, chunk: int, client: str) -> tuple[Result, Body]:
    assert stack.server is not None and stack.envoy is not None
    token = stack.token()
    pids = {"envoy": stack.envoy.process.pid, "server": stack.server.pid}
    before = {name: status_kib(pid, "VmRSS") for name, pid in pids.items()}
    for pid in pids.values():
        reset_peak(pid)
    body = Body(size, chunk)
    send = _post_rest if client == "rest" else _call_grpc
    with RssSampler(pids) as sampler:
        started = time.monotonic()
        answer, detail, file_path = send(stack, token, body)
        seconds = time.monotonic() - started
    peaks = {name: status_kib(pid, "VmHWM") for name, pid in pids.items()}
    result = Result(answer, detail, file_path, body.sent, seconds, peaks, sampler.peaks, before)
    return result, body


def verify(stack: Stack, result: Result, body: Body) -> Path:
    if result.file_path is None:
        raise BenchFailed(f"upload answered {result.answer}: {result.detail[:500]}")
    stored = stack.upload_root / result.file_path
    if stored.parent != stack.upload_root or not stored.is_file():
        raise BenchFailed(f"filePath {result.file_path!r} is not a file in {stack.upload_root}")
    if stored.stat().st_size != body.sent:
        raise BenchFailed(f"stored {stored.stat().st_size} bytes, sent {body.sent}")
    digest = hashlib.sha256()
    with stored.open("rb") as handle:
        while piece := handle.read(4 * MIB):
            digest.update(piece)
    if digest.hexdigest() != body.digest.hexdigest():
        raise BenchFailed("the stored file's SHA-256 differs from what was sent")
    return stored


def print_result(result: Result) -> None:
    print(
        f"  sent {result.sent:,} bytes ({result.sent / (1 << 30):.2f} GiB) "
        f"in {result.seconds:.1f} s: {result.mb_per_s:.0f} MB/s; answer {result.answer}"
    )
    for name in ("envoy", "server"):
        before = result.before_kib[name] / 1024
        peak = result.peaks_kib[name] / 1024
        print(
            f"  {name:6} RSS before {before:6.1f} MiB, peak {peak:6.1f} MiB "
            f"(+{peak - before:.1f}; VmHWM, sampled VmRSS peak "
            f"{result.sampled_kib.get(name, 0) / 1024:.1f} MiB)"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2G", help="bytes to upload (2G, 500M, ...)")
    parser.add_argument("--chunk", default="1M", help="size of the client's writes")
    parser.add_argument("--limit", default="10G", help="the server's MAX_UPLOAD_BYTES")
    parser.add_argument(
        "--client",
        choices=("rest", "grpc"),
        default="rest",
        help="POST /v1/upload (chunked HTTP/1.1), or native gRPC UploadFile, through Envoy",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = parse_size(args.size, "--size")
    chunk = parse_size(args.chunk, "--chunk")
    limit = parse_size(args.limit, "--limit")
    workdir = Path(tempfile.mkdtemp(prefix="bench-upload-"))
    print(
        f"Upload of {size:,} bytes through Envoy, {args.client} client, "
        f"MAX_UPLOAD_BYTES {limit:,} ({workdir})"
    )
    try:
        with running_stack(workdir, args.limit) as stack:
            result, body = upload(stack, size, chunk, args.client)
            print_result(result)
            if size > limit:
                left = list(stack.upload_root.iterdir()) if stack.upload_root.exists() else []
                if result.answer not in ("413", "RESOURCE_EXHAUSTED") or left:
                    raise BenchFailed(f"expected 413 and no file, got {result.answer}, {left}")
                print(f"  over the limit: {result.answer} and no file left behind, as expected")
                return 0
            stored = verify(stack, result, body)
            print(f"  SHA-256 of the stored file matches: {body.digest.hexdigest()}")
            stored.unlink()
    except BenchFailed as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
