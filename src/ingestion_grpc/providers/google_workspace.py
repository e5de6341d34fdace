"""Google Workspace: every user's Gmail, read through a service account with
domain-wide delegation, impersonating an administrator to list the users."""

from __future__ import annotations

import json
import re
from typing import Any

from ingestion_grpc.errors import InvalidArgument
from ingestion_grpc.providers.base import ConfigField, ConfigOnlyProvider, JsonDict

# Deliberately loose: it catches pasted names and missing domains, not every RFC 5322 corner.
EMAIL_PATTERN = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")

# The service-account key members the delegated token flow cannot do without.
REQUIRED_KEY_MEMBERS = ("client_email", "private_key")


class GoogleWorkspace(ConfigOnlyProvider):
    """A Google Workspace tenant."""

    display_name = "Google Workspace"
    name = "google_workspace"
    fields = (
        # The whole key file downloaded from the Cloud console, as a string. Secret.
        ConfigField("serviceAccountKeyJson", str, secret=True),
        # A super administrator the service account impersonates to list users.
        ConfigField("impersonatedAdminEmail", str),
    )

    @classmethod
    def check_values(cls, config: JsonDict) -> None:
        parse_service_account_key(config["serviceAccountKeyJson"])
        if not EMAIL_PATTERN.fullmatch(config["impersonatedAdminEmail"]):
            raise InvalidArgument(
                "providerConfig.impersonatedAdminEmail",
                "must be an email address, such as admin@example.com",
            )


def parse_service_account_key(text: str) -> dict[str, Any]:
    """The parsed key, or InvalidArgument that never quotes the key's content."""
    field = "providerConfig.serviceAccountKeyJson"
    error_at: tuple[int, int] | None = None
    try:
        key = json.loads(text)
    except json.JSONDecodeError as exc:
        # Keep only the position: the decoder's exception holds the whole key (`doc`),
        # so it is neither quoted nor chained (the error is raised outside `except`).
        error_at = (exc.lineno, exc.colno)
    if error_at is not None:
        raise InvalidArgument(
            field,
            f"is not valid JSON (line {error_at[0]}, column {error_at[1]}): "
            "paste the whole service account key file",
        )
    if not isinstance(key, dict):
        raise InvalidArgument(
            field, "must be a JSON object: paste the whole service account key file"
        )
    missing = [
        member
        for member in REQUIRED_KEY_MEMBERS
        if not isinstance(key.get(member), str) or not key[member].strip()
    ]
    if missing:
        raise InvalidArgument(
            field,
            f"is not a service account key: {' and '.join(missing)} missing or empty",
        )
    return key
