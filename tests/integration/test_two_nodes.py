"""Two nodes on this machine, as docs/deploying.md lays them out: each its own gRPC
server, worker, scheduler and Envoy (started with the `ingestion-grpc` subcommands,
as real processes) and its own DATA_DIR; PostgreSQL, Redis, the secrets and the
archive shared. Every process of the node importing a mailbox is killed with
SIGKILL; the other node must finish the import exactly: every message once, bytes
identical, the source back to `active`.

The archive is an S3 bucket on the suite's moto server (tests/support/s3.py), and
the mailbox holds 20,000 messages: one conditional PUT each, about 2.5 ms of
moto's CPU here. (A directory both nodes share, `ARCHIVE_URL=file://...`, is the
local store the fault tests kill workers over.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import secrets
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import redis

from ingestion_grpc.archive.blobstore import sha256_hex
from tests.support.dovecot import Dovecot
from tests.support.envoy import free_port, wait_healthy
from tests.support.polling import wait_for
from tests.support.rest import Rest
from tests.support.s3 import S3Archive
from tests.support.services import POSTGRES_ADMIN_URL, REDIS_URL

CLI = str(Path(sys.executable).parent / "ingestion-grpc")


MESSAGES = 20_000
# The first node dies once this many are archived: well into the import, far
# from its end.
KILL_AFTER = 3_000
# Blobs read back whole from the archive at the end (all of them are listed).
READ_BACK = 1_000
# How long the dead node's mailbox waits to be taken over. A live worker reports
# every quarter of it, however long its batch takes (engine/heartbeat.py).
STALE_RUN_AFTER = "5s"
WORKER_READY = "Worker process is ready for action."
ADMIN_EMAIL = "admin@example.com"


@dataclass
class Node:
    """One node's processes, each in a process group of its own."""

    name: str
    data_dir: Path
    environment: dict[str, str]
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log_path(self, part: str) -> Path:
        return self.data_dir / f"{part}.log"

    def log(self, part: str) -> str:
        path = self.log_path(part)
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, part: str, *args: str, **variables: str) -> None:
        with self.log_path(part).open("ab") as log:
            self.processes[part] = subprocess.Popen(
                [CLI, *args],
                env={**self.environment, **variables},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start_server(self) -> None:
        self.start("server", "server", GRPC_PORT=str(self.grpc_port))

    def start_scheduler(self) -> None:
        self.start("scheduler", "scheduler")

    def start_envoy(self, upstreams: list[int]) -> None:
        flags = [arg for port in upstreams for arg in ("--upstream", f"127.0.0.1:{port}")]
        self.start("envoy", "envoy", *flags, HTTP_HOST="127.0.0.1", HTTP_PORT=str(self.http_port))

    def start_worker(self) -> None:
        self.start("worker", "worker", "--processes", "2", "--threads", "2")
        wait_for(
            lambda: self.log("worker").count(WORKER_READY),
            lambda ready: ready >= 2 or self.processes["worker"].poll() is not None,
            timeout=60,
            what=f"{self.name}'s two worker processes",
        )
        assert self.processes["worker"].poll() is None, self.log("worker")

    def kill(self) -> None:
        """SIGKILL every process of the node (each group: the worker's children too)."""
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        for process in self.processes.values():
            process.wait()

    def stop(self) -> None:
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def message(index: int) -> bytes:
    body = f"Message {index} of the two-node import.\r\n".encode() * 40
    return (
        f"Message-ID: <{index}.two-nodes@example.com>\r\n"
        f"From: Sender {index % 97} <sender{index % 97}@example.com>\r\n"
        "To: archive@example.com\r\n"
        f"Subject: two nodes {index}\r\n"
        "Date: Mon, 02 Dec 2024 10:00:00 +0000\r\n"
        "\r\n"
    ).encode() + body


@contextlib.contextmanager
def shared_services() -> Iterator[dict[str, str]]:
    """What every node shares: a database and a Redis namespace of the test's own,
    and the secrets."""
    suffix = uuid.uuid4().hex[:12]
    database, namespace = f"ingestion_nodes_{suffix}", f"ingestion-nodes-{suffix}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    try:
        yield {
            "DATABASE_URL": f"{base}/{database}",
            "REDIS_URL": REDIS_URL,
            "QUEUE_NAMESPACE": namespace,
            "JWT_SECRET": secrets.token_urlsafe(32),
            "ENCRYPTION_KEY": secrets.token_hex(32),
            "ADMIN_EMAIL": ADMIN_EMAIL,
            "ADMIN_PASSWORD": secrets.token_urlsafe(16),
            "SCHEDULER_TICK": "1s",
            "METRICS_PORT": "0",
            "PYTHONUNBUFFERED": "1",
        }
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"{namespace}:*"):
            client.delete(key)
        client.close()


@pytest.fixture
def nodes(tmp_path: Path, s3_archive: S3Archive) -> Iterator[tuple[Node, Node]]:
    with shared_services() as shared:
        first, second = (
            Node(
                name,
                tmp_path / name,
                {
                    **os.environ,
                    **shared,
                    **s3_archive.environment,
                    "STALE_RUN_AFTER": STALE_RUN_AFTER,
                },
            )
            for name in ("node-a", "node-b")
        )
        for node in (first, second):
            node.data_dir.mkdir()
            node.environment["DATA_DIR"] = str(node.data_dir)
        try:
            yield first, second
        finally:
            for node in (first, second):
                node.stop()


def _established_to(port: int) -> set[str]:
    """Socket inodes of the machine's TCP connections to `port` on 127.0.0.1."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def _group_members(group: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            # Fields after the command name (which may hold spaces): state, ppid, pgrp.
            if (
                entry.name.isdigit()
                and int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[2]) == group
            ):
                members.append(int(entry.name))
    return members


def node_fetching_from(nodes: tuple[Node, Node], port: int) -> Node:
    """The node whose worker holds an IMAP connection to `port`: the one importing."""
    inodes = _established_to(port)
    for node in nodes:
        for pid in _group_members(node.processes["worker"].pid):
            with contextlib.suppress(OSError):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    link = os.readlink(fd)
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        return node
    raise AssertionError(f"no worker of either node is connected to port {port}")


def archived_rows(database_url: str, source_id: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(database_url) as db:
        rows = db.execute(
            "SELECT sha256, message_id, provider_message_id FROM archived_emails "
            "WHERE source_id = %s",
            (source_id,),
        ).fetchall()
    return [(str(a), str(b), str(c)) for a, b, c in rows]


def archived_count(database_url: str, source_id: str) -> int:
    with psycopg.connect(database_url) as db:
        row = db.execute(
            "SELECT count(*) FROM archived_emails WHERE source_id = %s", (source_id,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_the_other_node_finishes_an_import_after_one_is_killed(
    nodes: tuple[Node, Node], s3_archive: S3Archive, dovecot: Dovecot
) -> None:
    first, second = nodes
    total = MESSAGES
    messages = [message(index) for index in range(total)]
    email = dovecot.new_user("nodes")
    dovecot.fill_inbox(email, messages)
    assert dovecot.status(email, "INBOX")["messages"] == total

    # The first server migrates the empty database and creates the admin; then
    # the rest of both nodes. Each Envoy balances over both gRPC servers.
    first.start_server()
    first.start_envoy([first.grpc_port, second.grpc_port])
    wait_healthy(first.base_url, timeout=60)
    second.start_server()
    second.start_envoy([first.grpc_port, second.grpc_port])
    for node in (first, second):
        node.start_scheduler()
        node.start_worker()
    wait_healthy(second.base_url, timeout=60)
    password = first.environment["ADMIN_PASSWORD"]
    created = (
        Rest(first.base_url)
        .login(ADMIN_EMAIL, password)
        .post(
            "/v1/ingestion-sources",
            json={
                "name": "two nodes",
                "provider": "generic_imap",
                "providerConfig": dovecot.provider_config(
                    email, secure=True, allow_insecure_cert=True
                ),
            },
        )
    )
    assert created.status_code == 201, created.text
    source_id = created.json()["id"]
    database_url = first.environment["DATABASE_URL"]
    wait_for(
        lambda: archived_count(database_url, source_id),
        lambda count: count >= KILL_AFTER,
        timeout=120,
        what="the import to archive its first thousands",
    )
    importing = node_fetching_from(nodes, dovecot.tls_port)
    importing.kill()
    at_kill = archived_count(database_url, source_id)
    assert KILL_AFTER <= at_kill < total
    survivor = second if importing is first else first
    admin = Rest(survivor.base_url).login(ADMIN_EMAIL, password)

    # The surviving Envoy skips the dead gRPC server: every request is answered.
    for _ in range(20):
        response = admin.get(f"/v1/ingestion-sources/{source_id}")
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "importing"

    source = wait_for(
        lambda: admin.get(f"/v1/ingestion-sources/{source_id}").json(),
        lambda body: body["status"] != "importing",
        timeout=600,
        what="the second node to finish the import",
    )
    assert source["status"] == "active", source

    rows = archived_rows(database_url, source_id)
    assert len(rows) == total
    assert len({sha for sha, _, _ in rows}) == total
    assert len({message_id for _, message_id, _ in rows}) == total
    assert len({uid for _, _, uid in rows}) == total
    expected = {sha256_hex(raw) for raw in messages}
    assert {sha for sha, _, _ in rows} == expected
    # Every blob is in the archive, once; a sample is read back whole.
    store = s3_archive.store()
    assert sorted(sha for sha, _ in store.listing()) == sorted(expected)
    sample = random.Random(7).sample(sorted(expected), READ_BACK)
    assert [hashlib.sha256(store.read(sha)).hexdigest() for sha in sample] == sample
    store.close()

    sessions = admin.get(f"/v1/ingestion-sources/{source_id}/sync-sessions").json()
    run = sessions["syncSessions"][0]
    assert len(sessions["syncSessions"]) == 1
    assert (run["kind"], run["status"], run["messagesArchived"]) == (
        "import",
        "completed",
        total,
    )
    wait_healthy(survivor.base_url, timeout=5)
