"""Microsoft 365: every user's Exchange Online mailbox, read through Microsoft Graph
with an app registration's client credentials (application permissions)."""

from __future__ import annotations

from ingestion_grpc.providers.base import ConfigField, ConfigOnlyProvider


class Microsoft365(ConfigOnlyProvider):
    """A Microsoft 365 (Entra ID) tenant."""

    display_name = "Microsoft 365"
    name = "microsoft_365"
    fields = (
        # The directory (tenant) id, or one of the tenant's domain names.
        ConfigField("tenantId", str),
        # The application (client) id of the app registration.
        ConfigField("clientId", str),
        # A client secret of that app registration. Secret.
        ConfigField("clientSecret", str, secret=True),
    )
