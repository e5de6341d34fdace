"""providerConfig validation of every provider: accepted shapes, and 400s that name the
exact field (JSON spelling) without ever quoting a secret."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ingestion_grpc.errors import InvalidArgument
from ingestion_grpc.providers.base import Provider
from ingestion_grpc.providers.eml import EmlImport
from ingestion_grpc.providers.files import FileImport
from ingestion_grpc.providers.google_workspace import GoogleWorkspace
from ingestion_grpc.providers.imap import GenericImap
from ingestion_grpc.providers.mbox import MboxImport
from ingestion_grpc.providers.microsoft_365 import Microsoft365
from ingestion_grpc.providers.pst import PstImport
from ingestion_grpc.providers.registry import PROVIDERS, provider_class

# Markers that must never show up in an error message.
PRIVATE_KEY = "-----BEGIN PRIVATE KEY-----\nMIIEvQ-SECRET-KEY-MATERIAL\n-----END PRIVATE KEY-----\n"
SERVICE_ACCOUNT_KEY = json.dumps(
    {
        "type": "service_account",
        "project_id": "archive-test",
        "private_key_id": "0123abcd",
        "private_key": PRIVATE_KEY,
        "client_email": "ingest@archive-test.iam.gserviceaccount.com",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
)
CLIENT_SECRET = "Xy8Q~client-secret-SECRET-42"
IMAP_PASSWORD = "imap-password-SECRET-42"

VALID: dict[type[Provider], dict[str, Any]] = {
    GoogleWorkspace: {
        "serviceAccountKeyJson": SERVICE_ACCOUNT_KEY,
        "impersonatedAdminEmail": "admin@example.com",
    },
    Microsoft365: {
        "tenantId": "6f1c2d3e-0000-4000-8000-123456789abc",
        "clientId": "0a1b2c3d-0000-4000-8000-123456789abc",
        "clientSecret": CLIENT_SECRET,
    },
    GenericImap: {
        "host": "imap.example.com",
        "port": 993,
        "secure": True,
        "allowInsecureCert": False,
        "username": "alice@example.com",
        "password": IMAP_PASSWORD,
        "includeFolders": ["INBOX", "Archive/*"],
        "excludeFolders": ["Trash", "Junk*"],
    },
    PstImport: {"localFilePath": "/data/import/alice.pst"},
    EmlImport: {"uploadedFilePath": "uploads/2024/batch.zip"},
    MboxImport: {"localFilePath": "/data/import/list.mbox"},
}
ALL = list(VALID)
FILE_IMPORTS = [PstImport, EmlImport, MboxImport]
SECRETS = {
    GoogleWorkspace: ["serviceAccountKeyJson"],
    Microsoft365: ["clientSecret"],
    GenericImap: ["password"],
}
# A value of the wrong JSON type for each kind of field.
WRONG_TYPE: dict[type, list[Any]] = {
    str: [123, True, ["x"], {"a": "b"}],
    int: ["993", True, 993.5, [993]],
    bool: ["true", 1, 0, ["x"]],
    list: ["INBOX", 1, {"a": "b"}],
}


def invalid(cls: type[Provider], config: dict[str, Any]) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        cls.validate_config(config)
    return caught.value


def assert_no_secret(error: InvalidArgument, *values: str) -> None:
    text = " ".join([str(error), repr(error), error.field, error.description, repr(error.args)])
    for value in values:
        assert value not in text
        for line in value.splitlines():  # not even a part of a multi-line secret
            if len(line) > 8:
                assert line not in text


def all_secrets() -> list[str]:
    return [SERVICE_ACCOUNT_KEY, PRIVATE_KEY, CLIENT_SECRET, IMAP_PASSWORD]


def test_the_registry_serves_every_provider_by_its_name() -> None:
    # Plug-ins (the tests' fake_tenant, once the suite's settings are loaded) come on top.
    built_in = {
        n: c.__name__ for n, c in PROVIDERS.items() if c.__module__.startswith("ingestion_grpc")
    }
    assert built_in == {
        "google_workspace": "GoogleWorkspace",
        "microsoft_365": "Microsoft365",
        "generic_imap": "GenericImap",
        "pst_import": "PstImport",
        "eml_import": "EmlImport",
        "mbox_import": "MboxImport",
    }
    assert provider_class("generic_imap") is GenericImap
    assert invalid_provider("gmail").field == "provider"


def invalid_provider(name: str) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        provider_class(name)
    return caught.value


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
def test_a_valid_config_is_accepted_unchanged(cls: type[Provider]) -> None:
    assert cls.validate_config(VALID[cls]) == VALID[cls]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
def test_secret_fields_are_declared(cls: type[Provider]) -> None:
    assert cls.secret_fields() == frozenset(SECRETS.get(cls, []))


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
def test_an_unknown_field_is_named(cls: type[Provider]) -> None:
    error = invalid(cls, {**VALID[cls], "hostName": "x"})
    assert error.field == "providerConfig.hostName"
    assert_no_secret(error, *all_secrets())


REQUIRED = [(cls, spec.name) for cls in ALL for spec in cls.fields if spec.required]


@pytest.mark.parametrize(("cls", "name"), REQUIRED, ids=[f"{c.name}-{n}" for c, n in REQUIRED])
def test_a_missing_required_field_is_named(cls: type[Provider], name: str) -> None:
    config = dict(VALID[cls])
    del config[name]
    error = invalid(cls, config)
    assert error.field == f"providerConfig.{name}"
    assert error.description == "is required"
    assert_no_secret(error, *all_secrets())
    # null counts as missing
    assert invalid(cls, {**VALID[cls], name: None}).field == f"providerConfig.{name}"


WRONG = [
    (cls, spec.name, value)
    for cls in ALL
    for spec in cls.fields
    for value in WRONG_TYPE[spec.kind if isinstance(spec.kind, type) else spec.kind[0]]
]


@pytest.mark.parametrize(
    ("cls", "name", "value"), WRONG, ids=[f"{c.name}-{n}-{v!r}" for c, n, v in WRONG]
)
def test_a_field_of_the_wrong_type_is_named(cls: type[Provider], name: str, value: Any) -> None:
    error = invalid(cls, {**VALID[cls], name: value})
    assert error.field == f"providerConfig.{name}"
    assert error.description.startswith("must be")
    assert_no_secret(error, *all_secrets())


@pytest.mark.parametrize("cls", [GoogleWorkspace, Microsoft365, GenericImap], ids=lambda c: c.name)
def test_a_blank_required_string_is_refused(cls: type[Provider]) -> None:
    for spec in cls.fields:
        if spec.required and spec.kind is str:
            error = invalid(cls, {**VALID[cls], spec.name: "   "})
            assert error.field == f"providerConfig.{spec.name}"
            assert error.description == "must not be empty"


# --- Google Workspace ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (SERVICE_ACCOUNT_KEY[:-10], "is not valid JSON"),
        ("not json " + PRIVATE_KEY, "is not valid JSON"),
        (json.dumps([PRIVATE_KEY]), "must be a JSON object"),
        (json.dumps(PRIVATE_KEY), "must be a JSON object"),
        (json.dumps({"private_key": PRIVATE_KEY}), "client_email missing or empty"),
        (
            json.dumps({"client_email": "a@b.iam.gserviceaccount.com", "private_key": ""}),
            "private_key missing or empty",
        ),
        (json.dumps({"client_email": 7, "private_key": 8}), "client_email and private_key"),
    ],
    ids=["truncated", "garbage", "array", "string", "no-email", "empty-key", "wrong-types"],
)
def test_a_bad_service_account_key_is_refused_without_quoting_it(key: str, expected: str) -> None:
    error = invalid(GoogleWorkspace, {**VALID[GoogleWorkspace], "serviceAccountKeyJson": key})
    assert error.field == "providerConfig.serviceAccountKeyJson"
    assert expected in error.description
    assert_no_secret(error, key, PRIVATE_KEY, *all_secrets())
    # the JSON decoder's exception (whose .doc holds the whole key) is not chained
    assert error.__cause__ is None
    assert error.__context__ is None


@pytest.mark.parametrize("email", ["admin", "admin@", "@example.com", "ad min@example.com", "a@b"])
def test_the_impersonated_admin_must_be_an_email(email: str) -> None:
    error = invalid(GoogleWorkspace, {**VALID[GoogleWorkspace], "impersonatedAdminEmail": email})
    assert error.field == "providerConfig.impersonatedAdminEmail"


# --- Generic IMAP ----------------------------------------------------------------------


def imap(**changes: Any) -> dict[str, Any]:
    return {**VALID[GenericImap], **changes}


def test_imap_optional_fields_may_be_left_out_and_allow_insecure_cert_defaults_to_false() -> None:
    config = imap()
    for name in ("allowInsecureCert", "includeFolders", "excludeFolders"):
        del config[name]
    clean = GenericImap.validate_config(config)
    assert clean["allowInsecureCert"] is False
    assert "includeFolders" not in clean
    assert "excludeFolders" not in clean


def test_imap_port_arrives_as_a_json_number() -> None:
    # google.protobuf.Struct carries every number as a float
    clean = GenericImap.validate_config(imap(port=143.0))
    assert clean["port"] == 143
    assert isinstance(clean["port"], int)


@pytest.mark.parametrize("port", [0, -1, 65536, 1_000_000])
def test_imap_port_must_be_in_range(port: int) -> None:
    error = invalid(GenericImap, imap(port=port))
    assert error.field == "providerConfig.port"
    assert "between 1 and 65535" in error.description


@pytest.mark.parametrize("port", [1, 143, 993, 65535])
def test_imap_port_limits_are_accepted(port: int) -> None:
    assert GenericImap.validate_config(imap(port=port))["port"] == port


@pytest.mark.parametrize(
    "host",
    ["imaps://imap.example.com", "imap.example.com:993", "imap example.com", "a/b", "u@h"],
)
def test_imap_host_must_be_a_bare_host(host: str) -> None:
    assert invalid(GenericImap, imap(host=host)).field == "providerConfig.host"


@pytest.mark.parametrize("host", ["imap.example.com", "127.0.0.1", "::1", "fe80::1", "localhost"])
def test_imap_host_names_and_addresses_are_accepted(host: str) -> None:
    assert GenericImap.validate_config(imap(host=host))["host"] == host


@pytest.mark.parametrize("name", ["includeFolders", "excludeFolders"])
@pytest.mark.parametrize("patterns", [[""], ["INBOX", "  "], ["INBOX", 3], [None], [["a"]]])
def test_imap_folder_patterns_must_be_non_empty_strings(name: str, patterns: list[Any]) -> None:
    error = invalid(GenericImap, imap(**{name: patterns}))
    assert error.field == f"providerConfig.{name}"
    assert "non-empty string" in error.description


def test_imap_empty_folder_lists_are_accepted() -> None:
    clean = GenericImap.validate_config(imap(includeFolders=[], excludeFolders=[]))
    assert clean["includeFolders"] == []


@pytest.mark.parametrize("name", ["username", "password"])
@pytest.mark.parametrize("bad", ["\n", "\r", "\0"])
def test_imap_credentials_cannot_hold_line_breaks(name: str, bad: str) -> None:
    value = f"{IMAP_PASSWORD}{bad}A001 DELETE INBOX"
    error = invalid(GenericImap, imap(**{name: value}))
    assert error.field == f"providerConfig.{name}"
    assert_no_secret(error, value, IMAP_PASSWORD)


# --- File imports ------------------------------------------------------------------


@pytest.mark.parametrize("cls", FILE_IMPORTS, ids=lambda c: c.name)
def test_file_imports_share_one_config(cls: type[FileImport]) -> None:
    assert issubclass(cls, FileImport)
    assert cls.fields is FileImport.fields
    assert cls.validate_config({"localFilePath": "/x"}) == {"localFilePath": "/x"}
    assert cls.validate_config({"uploadedFilePath": "u/1"}) == {"uploadedFilePath": "u/1"}


@pytest.mark.parametrize("cls", FILE_IMPORTS, ids=lambda c: c.name)
def test_a_file_import_needs_a_path(cls: type[FileImport]) -> None:
    error = invalid(cls, {})
    assert error.field == "providerConfig.localFilePath"
    assert "uploadedFilePath" in error.description


@pytest.mark.parametrize("cls", FILE_IMPORTS, ids=lambda c: c.name)
def test_a_file_import_takes_only_one_path(cls: type[FileImport]) -> None:
    error = invalid(cls, {"localFilePath": "/x", "uploadedFilePath": "u/1"})
    assert error.field == "providerConfig.localFilePath"
    assert "exactly one" in error.description


@pytest.mark.parametrize("cls", FILE_IMPORTS, ids=lambda c: c.name)
@pytest.mark.parametrize("name", ["localFilePath", "uploadedFilePath"])
def test_a_file_import_path_must_not_be_blank(cls: type[FileImport], name: str) -> None:
    error = invalid(cls, {name: " "})
    assert error.field == f"providerConfig.{name}"
    assert error.description == "must not be empty"
