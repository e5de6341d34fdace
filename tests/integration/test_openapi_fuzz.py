"""The OpenAPI document (`make gen`) against what Envoy really serves.

Envoy serves the generated document at GET /v1/openapi.json without credentials.
Schemathesis then fuzzes every operation it declares through Envoy with a valid
token, positive and negative data alike, and the test fails on any 5xx, any status
code, content type or body the document does not declare, and any request that
hangs. It is bounded: a fixed, small number of examples per operation (derandomized,
so that a failure reproduces), a timeout per request.

The fuzzer shares the server with the other tests, so it acts as an admin of its
own and acts on what it created: half of the examples of an operation on one
source, run, message or key get a real one (a source on a small mbox, imported by
a worker), the others the generated id; each DELETE of a real source or key gets
one made for it. Likewise every other create, login and rename gets a valid body,
so that successes are checked too, not only rejections. The system settings it
changes are put back afterwards, and every source it made is deleted.
"""

from __future__ import annotations

import json
import mailbox
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.checks import not_a_server_error
from schemathesis.core.transport import Response
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ingestion_grpc.config import Settings
from ingestion_grpc.envoy_config import OPENAPI_DOCUMENT
from tests.support.corpora import SPAM, mbox_messages
from tests.support.rest import Rest
from tests.support.services import ADMIN_EMAIL, ADMIN_PASSWORD
from tests.support.sources import archived, create_source, latest_run, settled
from tests.support.workers import Worker

EXAMPLES_PER_OPERATION = 12
REQUEST_TIMEOUT = 15.0  # seconds; a request that takes longer fails as hung
MBOX_MESSAGES = 3
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]

# The committed document; test_envoy_serves_the_generated_document_... checks that Envoy
# serves exactly these bytes. (A schema loaded from a fixture would be fuzzed in one
# pytest item; this way each operation is a test of its own.)
schema = schemathesis.openapi.from_path(OPENAPI_DOCUMENT)


@dataclass
class Fuzz:
    """Real resources of the fuzzer's own, and what to undo afterwards."""

    client: Rest
    settings: Settings
    mbox: Path
    source_id: str = ""
    run_id: str = ""
    email_id: str = ""
    created_sources: set[str] = field(default_factory=set)
    seen: Counter[str] = field(default_factory=Counter)

    @property
    def headers(self) -> dict[str, str]:
        return self.client.headers()

    def new_source(self) -> str:
        source = create_source(
            self.client,
            f"fuzz-{uuid.uuid4().hex[:8]}",
            "mbox_import",
            {"localFilePath": str(self.mbox)},
        )
        self.created_sources.add(source["id"])
        return str(source["id"])

    def new_api_key(self) -> str:
        response = self.client.post("/v1/api-keys", json={"name": "fuzz", "expiresInDays": 1})
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def prepare(self, case: Case[Any]) -> None:
        """Every other example of an operation gets real path parameters, and a valid
        body where random ones are (almost) never valid."""
        self.seen[case.operation.label] += 1
        if self.seen[case.operation.label] % 2:
            return
        if case.path_parameters:
            self._real_path_parameters(case)
        body = self._valid_body(case.method.upper(), case.operation.path)
        if body is not None:
            case.body = body

    def _valid_body(self, method: str, path: str) -> dict[str, Any] | None:
        if (method, path) == ("POST", "/v1/ingestion-sources"):
            return {
                "name": f"fuzz-{uuid.uuid4().hex[:8]}",
                "provider": "mbox_import",
                "providerConfig": {"localFilePath": str(self.mbox)},
            }
        if (method, path) == ("POST", "/v1/api-keys"):
            return {"name": "fuzz", "expiresInDays": 1}
        if (method, path) == ("POST", "/v1/auth/login"):
            return {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
        if (method, path) == ("PUT", "/v1/ingestion-sources/{id}"):
            return {"name": f"fuzz-{uuid.uuid4().hex[:8]}"}
        return None

    def _real_path_parameters(self, case: Case[Any]) -> None:
        path = case.operation.path
        method = case.method.upper()
        real: dict[str, str]
        if path == "/v1/api-keys/{id}":
            real = {"id": self.new_api_key()}
        elif path == "/v1/ingestion-sources/{id}" and method == "DELETE":
            real = {"id": self.new_source()}
        elif path.startswith("/v1/ingestion-sources/{id}"):
            real = {"id": self.source_id, "session_id": self.run_id}
        elif path.startswith("/v1/ingestion-sources/{source_id}"):
            real = {"source_id": self.source_id}
        elif path.startswith("/v1/archived-emails/{id}"):
            real = {"id": self.email_id}
        else:
            raise AssertionError(f"no real resource for {path}: add one to Fuzz.prepare")
        case.path_parameters = {
            name: real.get(name, value) for name, value in case.path_parameters.items()
        }

    def record(self, case: Case[Any], response: Response) -> None:
        if case.operation.path == "/v1/ingestion-sources" and response.status_code == 201:
            self.created_sources.add(response.json()["id"])


@pytest.fixture(scope="module")
def fuzz(
    make_client: Callable[[str], Rest],
    settings: Settings,
    environment: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Fuzz]:
    folder = settings.import_root / f"fuzz-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    box = mailbox.mbox(folder / "small.mbox")
    for raw in mbox_messages(SPAM)[:MBOX_MESSAGES]:
        box.add(raw)
    box.close()
    fuzz = Fuzz(make_client("admin"), settings, folder / "small.mbox")
    before = fuzz.client.get("/v1/settings/system").json()
    worker = Worker(environment, tmp_path_factory.mktemp("fuzz") / "worker.log").start()
    # So that DELETE of a source can succeed; the fuzzer may turn it off again.
    fuzz.client.put("/v1/settings/system", json={"enableDeletion": True})
    fuzz.source_id = fuzz.new_source()
    assert settled(fuzz.client, fuzz.source_id)["status"] == "imported"
    fuzz.run_id = latest_run(fuzz.client, fuzz.source_id)["id"]
    fuzz.email_id = archived(fuzz.client, fuzz.source_id)[0]["id"]
    yield fuzz
    fuzz.client.put("/v1/settings/system", json={"enableDeletion": True})
    for source_id in fuzz.created_sources:
        # Paused first: a run the fuzzer started stops at its next batch.
        fuzz.client.post(f"/v1/ingestion-sources/{source_id}/pause")
        response = fuzz.client.delete(f"/v1/ingestion-sources/{source_id}")
        assert response.status_code in (204, 404), response.text
    restored = fuzz.client.put("/v1/settings/system", json=before)
    assert restored.status_code == 200, restored.text
    # Stopped last: what the fuzzer left queued finds its source gone and ends.
    worker.stop()
    shutil.rmtree(folder, ignore_errors=True)


def test_envoy_serves_the_generated_document_without_credentials(rest_url: str) -> None:
    response = requests.get(f"{rest_url}/v1/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.content == OPENAPI_DOCUMENT.read_bytes()
    document = response.json()
    assert document["openapi"].startswith("3.")
    # Only GET: anything else is not a method of the API.
    other = requests.post(f"{rest_url}/v1/openapi.json", timeout=10)
    assert other.status_code == 404
    assert other.json()["code"] == 5


def test_headers_grpc_metadata_cannot_carry_are_dropped(admin: Rest) -> None:
    """HTTP allows header names like `x|y`, gRPC metadata does not, and the server
    used to refuse such a request with a 500 (found by the fuzzer). Envoy drops
    them; the other headers still count."""
    response = admin.get("/v1/ingestion-sources", headers={"X|Odd": "1", "X-Fine": "ok"})
    assert response.status_code == 200, response.text
    unauthenticated = requests.get(
        f"{admin.base_url}/v1/ingestion-sources", headers={"X|Odd": "1"}, timeout=10
    )
    assert unauthenticated.status_code == 401


def test_the_document_declares_every_rpc_with_its_rest_status() -> None:
    """Each gRPC method of ingestion.v1 is an operation, with the success status the
    server sends (x-http-code) and no other 2xx."""
    document = json.loads(OPENAPI_DOCUMENT.read_text(encoding="utf-8"))
    successes = {
        operation["x-grpc-method"].rpartition("/")[2]: [
            code for code in operation["responses"] if code.startswith("2")
        ]
        for path in document["paths"].values()
        for operation in path.values()
    }
    assert successes == {
        "CreateApiKey": ["201"],
        "CreateIngestionSource": ["201"],
        "DeleteApiKey": ["204"],
        "DeleteIngestionSource": ["204"],
        "ForceSync": ["202"],
        "GetArchivedEmail": ["200"],
        "GetArchivedEmailRaw": ["200"],
        "GetIngestionSource": ["200"],
        "GetSystemSettings": ["200"],
        "ListApiKeys": ["200"],
        "ListAuditEvents": ["200"],
        "ListArchivedEmails": ["200"],
        "ListIngestionSources": ["200"],
        "ListSyncSessionMailboxes": ["200"],
        "ListSyncSessions": ["200"],
        "Login": ["200"],
        "PauseIngestionSource": ["200"],
        "TriggerInitialImport": ["202"],
        "UpdateIngestionSource": ["200"],
        "UpdateSystemSettings": ["200"],
        "UploadFile": ["201"],
    }


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_as_the_document_says(
    case: Case[Any], fuzz: Fuzz, rest_url: str
) -> None:
    fuzz.prepare(case)
    response = case.call_and_validate(
        base_url=rest_url, headers=fuzz.headers, checks=CHECKS, timeout=REQUEST_TIMEOUT
    )
    fuzz.record(case, response)
