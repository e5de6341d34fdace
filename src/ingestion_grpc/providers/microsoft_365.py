"""Microsoft 365: every user's Exchange Online mailbox, read through Microsoft Graph
with an app registration's client credentials (application permissions)."""

from __future__ import annotations

from ingestion_grpc.providers.base import ConfigField, Provider


class Microsoft365(Provider):
    """A Microsoft 365 (Entra ID) tenant."""

    name = "microsoft_365"
    fields = (
        # The directory (tenant) id, or one of the tenant's domain names.
        ConfigField("tenantId", str),
        # The application (client) id of the app registration.
        ConfigField("clientId", str),
        # A client secret of that app registration. Secret.
        ConfigField("clientSecret", str, secret=True),
    )

    def check_connection(self) -> None:
        """Nothing is checked yet: only the structure of the config is validated.

        A later change acquires a client-credentials token and lists one user.
        """
