"""Native gRPC clients, on the server's own port and through Envoy: the same
authentication, permissions and errors as REST."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from ingestion.v1 import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    ingestion_service_pb2,
    ingestion_service_pb2_grpc,
)

from tests.support.fake_tenant import tenant_config
from tests.support.rest import Rest
from tests.support.services import ADMIN_EMAIL, ADMIN_PASSWORD


def _token(
    grpc_channel: grpc.Channel, email: str = ADMIN_EMAIL, password: str = ADMIN_PASSWORD
) -> str:
    response = auth_service_pb2_grpc.AuthServiceStub(grpc_channel).Login(
        auth_service_pb2.LoginRequest(email=email, password=password)
    )
    return response.access_token


def _create_request(
    name: str = "grpc source",
) -> ingestion_service_pb2.CreateIngestionSourceRequest:
    config = struct_pb2.Struct()
    config.update(tenant_config())
    return ingestion_service_pb2.CreateIngestionSourceRequest(
        name=name, provider="fake_tenant", provider_config=config
    )


def test_create_get_list_over_grpc(grpc_channel: grpc.Channel) -> None:
    stub = ingestion_service_pb2_grpc.IngestionServiceStub(grpc_channel)
    metadata = (("authorization", f"Bearer {_token(grpc_channel)}"),)
    created = stub.CreateIngestionSource(_create_request(), metadata=metadata)
    assert created.status == "importing"
    got = stub.GetIngestionSource(
        ingestion_service_pb2.GetIngestionSourceRequest(id=created.id), metadata=metadata
    )
    assert got.name == "grpc source"
    listed = list(
        stub.ListIngestionSources(
            ingestion_service_pb2.ListIngestionSourcesRequest(), metadata=metadata
        )
    )
    assert created.id in {s.id for s in listed}


def test_unauthenticated_and_bad_token_over_grpc(grpc_channel: grpc.Channel) -> None:
    stub = ingestion_service_pb2_grpc.IngestionServiceStub(grpc_channel)
    for metadata in [(), (("authorization", "Bearer nope"),), (("x-api-key", "ik_nope"),)]:
        with pytest.raises(grpc.RpcError) as raised:
            list(
                stub.ListIngestionSources(
                    ingestion_service_pb2.ListIngestionSourcesRequest(), metadata=metadata
                )
            )
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_missing_permission_over_grpc(
    grpc_channel: grpc.Channel, make_client: Callable[[str], Rest]
) -> None:
    viewer = make_client("viewer")
    stub = ingestion_service_pb2_grpc.IngestionServiceStub(grpc_channel)
    with pytest.raises(grpc.RpcError) as raised:
        stub.CreateIngestionSource(
            _create_request(), metadata=(("authorization", f"Bearer {viewer.token}"),)
        )
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "create:ingestion" in raised.value.details()


def test_invalid_argument_carries_bad_request_details(grpc_channel: grpc.Channel) -> None:
    stub = ingestion_service_pb2_grpc.IngestionServiceStub(grpc_channel)
    request = _create_request()
    request.provider_config.fields.pop("endpoint")
    with pytest.raises(grpc.RpcError) as raised:
        stub.CreateIngestionSource(
            request, metadata=(("authorization", f"Bearer {_token(grpc_channel)}"),)
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(raised.value)
    assert status is not None
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    assert detail.field_violations[0].field == "providerConfig.endpoint"


def test_health_and_reflection_are_open(grpc_channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(grpc_channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(grpc_channel)
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for s in next(iter(responses)).list_services_response.service}
    assert {
        "ingestion.v1.IngestionService",
        "ingestion.v1.AuthService",
        "ingestion.v1.ApiKeyService",
        "ingestion.v1.SettingsService",
        "grpc.health.v1.Health",
    } <= names


def test_healthz_through_envoy(rest_url: str) -> None:
    import requests

    assert requests.get(f"{rest_url}/healthz", timeout=10).status_code == 200


def test_every_rpc_over_grpc(grpc_channel: grpc.Channel, admin: Rest) -> None:
    from google.protobuf import empty_pb2
    from ingestion.v1 import (
        archive_service_pb2,
        archive_service_pb2_grpc,
        settings_service_pb2,
        settings_service_pb2_grpc,
    )

    auth = (("authorization", f"Bearer {_token(grpc_channel)}"),)
    sources = ingestion_service_pb2_grpc.IngestionServiceStub(grpc_channel)
    settings = settings_service_pb2_grpc.SettingsServiceStub(grpc_channel)
    keys = auth_service_pb2_grpc.ApiKeyServiceStub(grpc_channel)
    archive = archive_service_pb2_grpc.ArchiveServiceStub(grpc_channel)

    created = sources.CreateIngestionSource(_create_request("every rpc"), metadata=auth)
    source_id = created.id
    paused = sources.PauseIngestionSource(
        ingestion_service_pb2.PauseIngestionSourceRequest(id=source_id), metadata=auth
    )
    assert paused.status == "paused"
    resumed = sources.UpdateIngestionSource(
        ingestion_service_pb2.UpdateIngestionSourceRequest(id=source_id, status="active"),
        metadata=auth,
    )
    assert resumed.status == "importing", "resuming continues the interrupted import"
    assert (
        sources.GetIngestionSource(
            ingestion_service_pb2.GetIngestionSourceRequest(id=source_id), metadata=auth
        ).status
        == "importing"
    )
    with pytest.raises(grpc.RpcError) as running:
        sources.ForceSync(ingestion_service_pb2.ForceSyncRequest(id=source_id), metadata=auth)
    assert running.value.code() == grpc.StatusCode.ABORTED
    with pytest.raises(grpc.RpcError) as importing:
        sources.TriggerInitialImport(
            ingestion_service_pb2.TriggerInitialImportRequest(id=source_id), metadata=auth
        )
    assert importing.value.code() == grpc.StatusCode.ABORTED
    sessions = sources.ListSyncSessions(
        ingestion_service_pb2.ListSyncSessionsRequest(id=source_id), metadata=auth
    )
    assert sessions.next_page_token == ""
    listed = archive.ListArchivedEmails(
        archive_service_pb2.ListArchivedEmailsRequest(source_id=source_id), metadata=auth
    )
    assert (listed.total_size, list(listed.archived_emails)) == (0, [])
    with pytest.raises(grpc.RpcError) as missing:
        archive.GetArchivedEmail(
            archive_service_pb2.GetArchivedEmailRequest(id="no-such-email"), metadata=auth
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    key = keys.CreateApiKey(
        auth_service_pb2.CreateApiKeyRequest(name="grpc", expires_in_days=1), metadata=auth
    )
    assert key.key.startswith("ik_")
    listed_keys = keys.ListApiKeys(auth_service_pb2.ListApiKeysRequest(), metadata=auth)
    assert key.id in {k.id for k in listed_keys.api_keys}
    assert isinstance(
        keys.DeleteApiKey(auth_service_pb2.DeleteApiKeyRequest(id=key.id), metadata=auth),
        empty_pb2.Empty,
    )

    enabled = settings.UpdateSystemSettings(
        settings_service_pb2.UpdateSystemSettingsRequest(enable_deletion=True), metadata=auth
    )
    try:
        assert enabled.enable_deletion
        sources.DeleteIngestionSource(
            ingestion_service_pb2.DeleteIngestionSourceRequest(id=source_id), metadata=auth
        )
    finally:
        settings.UpdateSystemSettings(
            settings_service_pb2.UpdateSystemSettingsRequest(enable_deletion=False),
            metadata=auth,
        )
    assert not settings.GetSystemSettings(
        settings_service_pb2.GetSystemSettingsRequest(), metadata=auth
    ).enable_deletion
    with pytest.raises(grpc.RpcError) as gone:
        sources.GetIngestionSource(
            ingestion_service_pb2.GetIngestionSourceRequest(id=source_id), metadata=auth
        )
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
