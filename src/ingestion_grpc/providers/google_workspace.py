"""Google Workspace: every user's Gmail, read through a service account with
domain-wide delegation, impersonating an administrator to list the users.

Configuration: `serviceAccountKeyJson` (the key file, secret), `impersonatedAdminEmail`,
optional `includeUsers` / `excludeUsers` (glob patterns on the primary email,
case-insensitive), `includeSpamTrash` (default false), `maxConcurrentMailboxes`.
Tokens come from the key's own `token_uri` (google-auth, `subject=`): as the admin
for both scopes at once (Directory to list users, Gmail), as each user for Gmail.
`ProviderEnvironment.google_api_endpoint` (GOOGLE_API_ENDPOINT), when set, replaces
the root of both APIs.

Mailboxes are the Directory's users: id = the user's `id` (stable; the key of the
user's shared quota), display name = the primary email, which the fetch
impersonates. A user the Directory marks suspended is listed with a skip reason
(suspended users cannot be impersonated); one whose token is refused later, whose
Gmail is not enabled (400 failedPrecondition), or whose mailbox calls answer
403/404 without a rate limit, makes `fetch` raise MailboxUnavailable with the
reason. A refusal that is the whole source's (delegation not granted or revoked,
the key deleted, the admin not allowed to list users) is ProviderAuthError, whose
text says what to fix and never quotes the key. Reading a mailbox: `google_fetch`.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

from google.auth.exceptions import GoogleAuthError
from google.oauth2 import service_account

from ingestion_grpc.errors import (
    ConnectionCheckFailed,
    InvalidArgument,
    MailboxUnavailable,
    ProviderAuthError,
    ProviderError,
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
    ProviderEnvironment,
    check_mailbox_concurrency,
    check_patterns,
)
from ingestion_grpc.providers.google_api import (
    DIRECTORY_SCOPE,
    GMAIL_SCOPE,
    PROJECT_QUOTA,
    USER_IN_FLIGHT,
    USER_QUOTA,
    ApiRefused,
    Client,
    Quota,
    Sleep,
    TokenRefused,
)
from ingestion_grpc.providers.google_fetch import fetch_user
from ingestion_grpc.providers.google_gmail import GmailUser
from ingestion_grpc.providers.retries import ATTEMPTS, RetryLater, is_loopback_host
from ingestion_grpc.text import TextRule

# Deliberately loose: it catches pasted names and missing domains, not every RFC 5322 corner.
EMAIL_PATTERN = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")

# The service-account key members the delegated token flow cannot do without.
REQUIRED_KEY_MEMBERS = ("client_email", "private_key")
KEY_FIELD = "providerConfig.serviceAccountKeyJson"
# The key file as downloaded: pretty-printed JSON, about 2.3 KB with a 2048-bit
# key, under 4 KB with a 4096-bit one.
KEY_FILE_TEXT = TextRule(16384, multiline=True)

USERS_PAGE_SIZE = 500
# Attempts of the connection check's calls: someone is waiting for the answer.
CHECK_ATTEMPTS = 3
SUSPENDED = (
    "suspended in Google Workspace: a suspended user's mail cannot be read through "
    "domain-wide delegation"
)
DELEGATION_CONSOLE = (
    "Google Admin console > Security > Access and data control > API controls > "
    "Manage Domain Wide Delegation"
)


class GoogleWorkspace(Provider):
    """A Google Workspace domain."""

    display_name = "Google Workspace"
    name = "google_workspace"
    fields = (
        # The whole key file downloaded from the Cloud console, as a string. Secret.
        ConfigField("serviceAccountKeyJson", str, secret=True, text=KEY_FILE_TEXT),
        # A super administrator the service account impersonates to list users.
        ConfigField("impersonatedAdminEmail", str),
        # Optional glob patterns on the users' primary emails, case-insensitive.
        ConfigField("includeUsers", list, required=False),
        ConfigField("excludeUsers", list, required=False),
        # Optional, default false: also archive what is in Spam and Trash.
        ConfigField("includeSpamTrash", bool, required=False),
        MAX_CONCURRENT_MAILBOXES_FIELD,
    )
    limits = (USER_QUOTA, PROJECT_QUOTA, USER_IN_FLIGHT)

    def __init__(self, config: Mapping[str, Any], environment: ProviderEnvironment) -> None:
        super().__init__(config, environment)
        # Tests make the backoff instant; production waits as `retries` says.
        self.retry_sleep: Sleep = time.sleep
        self.retry_attempts = ATTEMPTS
        self._credentials: Any = None
        self._admin_credentials: Any = None

    @classmethod
    def check_values(cls, config: JsonDict) -> None:
        parse_service_account_key(config["serviceAccountKeyJson"])
        if not EMAIL_PATTERN.fullmatch(config["impersonatedAdminEmail"]):
            raise InvalidArgument(
                "providerConfig.impersonatedAdminEmail",
                "must be an email address, such as admin@example.com",
            )
        check_patterns(config, "includeUsers", "excludeUsers")
        check_mailbox_concurrency(config)

    # --- the contract -------------------------------------------------------------

    def check_connection(self) -> None:
        """A token as the admin for both scopes at once, then one page of one user.

        Google refuses the whole token request when one scope is not granted, so a
        domain that granted only one of them fails here, not later on every user.
        """
        admin = self._admin_client(CHECK_ATTEMPTS)
        self._admin_call(
            lambda: admin.call(
                lambda s: s.users().list(customer="my_customer", maxResults=1, fields="users(id)")
            ),
            checking=True,
        )

    def list_mailboxes(self) -> list[Mailbox]:
        """Every user of the domain (all pages), filtered by includeUsers / excludeUsers."""
        admin = self._admin_client(self.retry_attempts)
        mailboxes: list[Mailbox] = []
        token: str | None = None
        while True:
            page = self._admin_call(partial(admin.call, _users_page(token)), checking=False)
            for user in page.get("users") or ():
                email = str(user.get("primaryEmail") or "")
                if user.get("id") and email:
                    reason = SUSPENDED if user.get("suspended") else ""
                    mailboxes.append(Mailbox(str(user["id"]), email, reason))
            token = page.get("nextPageToken")
            if not token:
                break
        mailboxes = globs.select(
            mailboxes,
            self.config.get("includeUsers"),
            self.config.get("excludeUsers"),
            key=lambda m: m.display_name,
            ignore_case=True,
        )
        return sorted(mailboxes, key=lambda m: m.display_name.lower())

    def fetch(
        self, mailbox: Mailbox, cursor: JsonDict | None, context: FetchContext
    ) -> Iterator[Batch]:
        """The user's mail after `cursor`, impersonating `mailbox.display_name`."""
        email = mailbox.display_name
        quota = Quota(context.limits, mailbox.id, self._project_key())
        in_flight = max(
            1,
            int(self.environment.limit_overrides.get(USER_IN_FLIGHT.name, USER_IN_FLIGHT.limit)),
        )
        client = Client(
            self._base_credentials().with_subject(email),
            "gmail",
            "v1",
            endpoint=self.environment.google_api_endpoint,
            sleep=self.retry_sleep,
            attempts=self.retry_attempts,
            quota=quota,
            in_flight=in_flight,
        )
        gmail = GmailUser(
            client, email, include_spam_trash=bool(self.config.get("includeSpamTrash"))
        )
        yield from fetch_user(
            gmail, cursor, context, in_flight=in_flight, token_refusal=self._token_refusal
        )

    # --- credentials and errors ---------------------------------------------------

    def _base_credentials(self) -> Any:
        """The key's credentials (Gmail scope, no subject yet); the key parsed once."""
        if self._credentials is None:
            key = parse_service_account_key(self.config["serviceAccountKeyJson"])
            failure = ""
            try:
                self._credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                    key, scopes=[GMAIL_SCOPE]
                )
            except (ValueError, GoogleAuthError) as exc:
                # Neither cryptography's nor google-auth's texts quote the key; a
                # chained exception would still carry the parsed key in a traceback.
                failure = type(exc).__name__
            if failure:
                raise ProviderAuthError(
                    "serviceAccountKeyJson: its private_key is not a PEM RSA private key "
                    f"({failure}): paste the key file exactly as the Cloud console "
                    "downloaded it"
                )
        return self._credentials

    def _admin_client(self, attempts: int) -> Client:
        if self._admin_credentials is None:
            # Both scopes in one token: the connection check proves both are granted,
            # and listing the users later reuses the same token.
            admin = str(self.config["impersonatedAdminEmail"])
            self._admin_credentials = (
                self._base_credentials()
                .with_scopes([DIRECTORY_SCOPE, GMAIL_SCOPE])
                .with_subject(admin)
            )
        return Client(
            self._admin_credentials,
            "admin",
            "directory_v1",
            endpoint=self.environment.google_api_endpoint,
            sleep=self.retry_sleep,
            attempts=attempts,
        )

    def _admin_call(self, call: Callable[[], JsonDict], *, checking: bool) -> JsonDict:
        admin = str(self.config["impersonatedAdminEmail"])
        try:
            result: JsonDict = call()
        except TokenRefused as exc:
            raise self._token_refusal(exc, admin) from None
        except ApiRefused as exc:
            if exc.status in (401, 403):
                raise ProviderAuthError(
                    f"the Directory API refused to list the users as impersonatedAdminEmail "
                    f"{admin} ({exc}): it must be a super administrator, or hold an admin "
                    "role that may read users"
                ) from None
            raise ConnectionCheckFailed(
                f"the Directory API refused to list the users ({exc})"
            ) from None
        except RetryLater as exc:
            message = f"Google's Directory API did not answer listing the users: {exc.reason}"
            if checking:
                raise ConnectionCheckFailed(message) from None
            raise ProviderUnavailable(message) from None
        return result

    def _token_refusal(self, exc: TokenRefused, subject: str) -> ProviderError:
        """What a refused token means: the source's problem, or only this user's."""
        key = self._key()
        said = str(exc)
        description = exc.description.lower()
        admin = subject.lower() == str(self.config["impersonatedAdminEmail"]).lower()
        if exc.error == "unauthorized_client":
            client_id = key.get("client_id") or (
                f"(the Unique ID of {key.get('client_email')} in the Cloud console)"
            )
            return ProviderAuthError(
                f"Google refused a token for {subject} ({said}): domain-wide delegation is "
                f"not granted, or no longer, for both scopes. In the {DELEGATION_CONSOLE}, "
                f"give client ID {client_id} the scopes {DIRECTORY_SCOPE},{GMAIL_SCOPE}"
            )
        if exc.error == "invalid_client" or "signature" in description:
            return ProviderAuthError(
                f"Google refused the key of service account {key.get('client_email')} "
                f"({said}): the key was deleted or disabled, or is not this account's; "
                "create a new key and paste it into serviceAccountKeyJson"
            )
        if exc.error == "invalid_grant" and ("jwt" in description or "token" in description):
            return ProviderAuthError(
                f"Google refused the service account's signed request ({said}); "
                "check that this server's clock is right"
            )
        if admin:
            return ProviderAuthError(
                f"Google refused a token for impersonatedAdminEmail {subject} ({said}): it "
                "must be an existing, active administrator of the domain"
            )
        return MailboxUnavailable(
            f"Google refused a token for {subject} ({said}): a suspended or deleted user "
            "cannot be impersonated"
        )

    def _key(self) -> dict[str, Any]:
        return parse_service_account_key(self.config["serviceAccountKeyJson"])

    def _project_key(self) -> str:
        key = self._key()
        return str(key.get("project_id") or key["client_email"])


def _users_page(token: str | None) -> Callable[[Any], Any]:
    return lambda s: s.users().list(
        customer="my_customer",
        maxResults=USERS_PAGE_SIZE,
        orderBy="email",
        pageToken=token,
        fields="users(id,primaryEmail,suspended),nextPageToken",
    )


def parse_service_account_key(text: str) -> dict[str, Any]:
    """The parsed key, or InvalidArgument that never quotes the key's content."""
    error_at: tuple[int, int] | None = None
    try:
        key = json.loads(text)
    except json.JSONDecodeError as exc:
        # Keep only the position: the decoder's exception holds the whole key (`doc`),
        # so it is neither quoted nor chained (the error is raised outside `except`).
        error_at = (exc.lineno, exc.colno)
    if error_at is not None:
        raise InvalidArgument(
            KEY_FIELD,
            f"is not valid JSON (line {error_at[0]}, column {error_at[1]}): "
            "paste the whole service account key file",
        )
    if not isinstance(key, dict):
        raise InvalidArgument(
            KEY_FIELD, "must be a JSON object: paste the whole service account key file"
        )
    missing = [
        member
        for member in REQUIRED_KEY_MEMBERS
        if not isinstance(key.get(member), str) or not key[member].strip()
    ]
    if missing:
        raise InvalidArgument(
            KEY_FIELD,
            f"is not a service account key: {' and '.join(missing)} missing or empty",
        )
    _check_token_uri(key.get("token_uri"))
    return key


def _check_token_uri(value: Any) -> None:
    """https, or http to this machine only (a local fake or proxy): the signed
    assertion sent there is a credential for an hour."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument(KEY_FIELD, "is not a service account key: token_uri missing or empty")
    url = urllib.parse.urlsplit(value)
    if url.scheme == "https" and url.hostname:
        return
    if url.scheme == "http" and url.hostname and is_loopback_host(url.hostname):
        return
    raise InvalidArgument(KEY_FIELD, "token_uri must be an https URL")
