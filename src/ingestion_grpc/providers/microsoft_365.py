"""Microsoft 365: every user's Exchange Online mailbox, read through Microsoft Graph
with an app registration's client credentials (application permissions User.Read.All
and Mail.Read, with admin consent).

- `check_connection`: a token, then `GET /v1.0/users?$top=1&$select=id`. An unknown
  tenant or client, an invalid or expired secret and missing permissions raise
  ProviderAuthError (a ConnectionCheckFailed) saying which; the secret is never quoted.
- `list_mailboxes`: every user (`$select=id,userPrincipalName,mail,userType`, every
  page), filtered by `includeUsers` / `excludeUsers` (globs on the userPrincipalName,
  case-insensitive). The mailbox id is the user's object id, its display name the
  UPN. A guest (`userType` Guest, or `#EXT#` in the UPN) has no mailbox in this
  tenant: it comes with a `skip_reason`.
- `fetch`: raises MailboxUnavailable before its first batch when the user has no
  mailbox Graph can read (404 MailboxNotEnabledForRESTAPI / ResourceNotFound: no
  licence, on-premises) or Graph denies that mailbox (403). Otherwise every folder
  (hidden ones, Junk Email and Deleted Items included) filtered by `includeFolders` /
  `excludeFolders` (globs on the path, case-sensitive, as for IMAP), read with
  per-folder delta queries (see `graph_sync`; the cursor: `graph_folders`).
  A message that 404s on `$value` is reported skipped; one that keeps failing is
  reported failed, kept in the cursor and fetched on the next run.
- Errors: ProviderAuthError when the credentials stop working (a rotated or expired
  secret); ProviderUnavailable when Graph cannot be reached or keeps throttling.

Limits (`graph_client`): every Graph call for a mailbox takes a token of the
`graph_mailbox_requests` bucket and holds one of the `graph_mailbox_concurrency`
places, both keyed by app and mailbox and shared by every worker; the fetch keeps as
many downloads in flight as that concurrency limit allows (LIMIT_GRAPH_MAILBOX_CONCURRENCY
overrides both). Where Microsoft applies the 4 concurrent requests per app rather than
per mailbox, set the source's maxConcurrentMailboxes to 1. Tokens, the msal
application kept per source and TLS trust: `graph_auth`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from ingestion_grpc.errors import (
    ConnectionCheckFailed,
    InvalidArgument,
    ProviderAuthError,
    ProviderUnavailable,
)
from ingestion_grpc.providers import globs
from ingestion_grpc.providers.base import (
    MAX_CONCURRENT_MAILBOXES_FIELD,
    Batch,
    ConfigField,
    FetchContext,
    JsonDict,
    Mailbox,
    Provider,
    check_mailbox_concurrency,
    check_patterns,
)
from ingestion_grpc.providers.graph_auth import Credentials, graph_app
from ingestion_grpc.providers.graph_client import (
    MAILBOX_CONCURRENCY,
    MAILBOX_REQUESTS,
    GraphClient,
    GraphError,
    MailboxGate,
)
from ingestion_grpc.providers.graph_folders import list_folders
from ingestion_grpc.providers.graph_sync import MailboxSync
from ingestion_grpc.providers.retries import RetryLater

# A directory (tenant) id or a domain name: it becomes a segment of the authority URL.
TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")
CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
GUEST_MARKER = "#ext#"
USER_PAGE = 999
# The connection check answers an API call: it does not wait out a long outage.
CHECK_ATTEMPTS = 3
PATTERN_FIELDS = ("includeUsers", "excludeUsers", "includeFolders", "excludeFolders")


class Microsoft365(Provider):
    """A Microsoft 365 (Entra ID) tenant."""

    display_name = "Microsoft 365"
    name = "microsoft_365"
    fields = (
        # The directory (tenant) id, or one of the tenant's domain names.
        ConfigField("tenantId", str),
        # The application (client) id of the app registration.
        ConfigField("clientId", str),
        # A client secret (its value) of that app registration. Secret.
        ConfigField("clientSecret", str, secret=True),
        # Optional glob patterns on the userPrincipalName, case-insensitive.
        ConfigField("includeUsers", list, required=False),
        ConfigField("excludeUsers", list, required=False),
        # Optional glob patterns on folder paths ("Inbox/Projects"), as for IMAP.
        ConfigField("includeFolders", list, required=False),
        ConfigField("excludeFolders", list, required=False),
        MAX_CONCURRENT_MAILBOXES_FIELD,
    )
    limits = (MAILBOX_REQUESTS, MAILBOX_CONCURRENCY)

    @classmethod
    def check_values(cls, config: JsonDict) -> None:
        if not TENANT_ID.fullmatch(config["tenantId"]):
            raise InvalidArgument(
                "providerConfig.tenantId",
                "must be the directory (tenant) id or a domain name of the tenant, "
                "such as contoso.onmicrosoft.com",
            )
        if not CLIENT_ID.fullmatch(config["clientId"]):
            raise InvalidArgument(
                "providerConfig.clientId",
                "must be the application (client) id of the app registration",
            )
        check_patterns(config, *PATTERN_FIELDS)
        check_mailbox_concurrency(config)

    def check_connection(self) -> None:
        """A token, then one user read: proves the tenant, the app, the secret and the
        directory permission; raises ConnectionCheckFailed (ProviderAuthError for the
        credentials and permissions) saying what failed."""
        try:
            client = self._client()
            client.get_json(
                client.url("/users?$top=1&$select=id"),
                what="reading the tenant's users",
                attempts=CHECK_ATTEMPTS,
            )
        except GraphError as exc:
            raise self._directory_refused(exc) from None
        except ProviderUnavailable as exc:
            raise ConnectionCheckFailed(str(exc)) from None
        except RetryLater as exc:
            raise ConnectionCheckFailed(f"Microsoft Graph kept failing: {exc.reason}") from None

    def list_mailboxes(self) -> list[Mailbox]:
        """Every selected user of the tenant, guests with a skip reason."""
        client = self._client()
        url = client.url(f"/users?$select=id,userPrincipalName,mail,userType&$top={USER_PAGE}")
        try:
            users = [
                user
                for user in client.pages(url, what="listing the tenant's users")
                if isinstance(user.get("id"), str)
                and isinstance(user.get("userPrincipalName"), str)
            ]
        except GraphError as exc:
            error = self._directory_refused(exc)
            if isinstance(error, ProviderAuthError):
                raise error from None
            raise ProviderUnavailable(str(error)) from None
        except RetryLater as exc:
            raise ProviderUnavailable(f"Microsoft Graph kept failing: {exc.reason}") from None
        chosen = globs.select(
            users,
            self.config.get("includeUsers"),
            self.config.get("excludeUsers"),
            key=lambda user: str(user["userPrincipalName"]),
            ignore_case=True,
        )
        return [
            Mailbox(str(user["id"]), str(user["userPrincipalName"]), _skip_reason(user))
            for user in chosen
        ]

    def fetch(
        self, mailbox: Mailbox, cursor: JsonDict | None, context: FetchContext
    ) -> Iterator[Batch]:
        """The mailbox's batches after `cursor` (see `graph_sync`)."""
        client = self._client()
        gate = MailboxGate(context.limits, f"{self.config['clientId']}/{mailbox.id}")
        name = f"graph-{mailbox.display_name}"  # its threads' names, for logs and py-spy
        listed = list_folders(
            client, mailbox.id, gate, concurrency=self.requests_in_flight(), name=name
        )
        folders = globs.select(
            listed,
            self.config.get("includeFolders"),
            self.config.get("excludeFolders"),
            key=lambda folder: folder.path,
        )
        sync = MailboxSync(
            client,
            mailbox.id,
            gate,
            context.archive,
            concurrency=self.requests_in_flight(),
            name=name,
        )
        yield from sync.batches(folders, cursor)

    def requests_in_flight(self) -> int:
        """Downloads kept in flight per mailbox: the (overridable) concurrency limit."""
        limit = self.environment.limit_overrides.get(MAILBOX_CONCURRENCY.name)
        return max(1, int(limit if limit is not None else MAILBOX_CONCURRENCY.limit))

    def _client(self) -> GraphClient:
        credentials = Credentials(
            authority_host=self.environment.microsoft_authority_host,
            graph_endpoint=self.environment.microsoft_graph_endpoint,
            tenant_id=str(self.config["tenantId"]),
            client_id=str(self.config["clientId"]),
            client_secret=str(self.config["clientSecret"]),
        )
        return GraphClient(graph_app(credentials))

    def _directory_refused(self, exc: GraphError) -> ConnectionCheckFailed:
        if exc.status == 403:
            return ProviderAuthError(
                f"Microsoft Graph denied the app access to the tenant's users (403 {exc.code}): "
                f"the app registration {self.config['clientId']!r} needs the application "
                "permissions User.Read.All and Mail.Read, and an administrator of tenant "
                f"{self.config['tenantId']!r} must grant admin consent for them"
            )
        return ConnectionCheckFailed(
            f"Microsoft Graph refused to list the tenant's users ({exc.status} {exc.code}: "
            f"{exc.message})"
        )


def _skip_reason(user: dict[str, Any]) -> str:
    upn = str(user["userPrincipalName"])
    if str(user.get("userType") or "").casefold() == "guest" or GUEST_MARKER in upn.casefold():
        return "a guest account: its mailbox belongs to another organisation"
    return ""
