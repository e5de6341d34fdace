"""The one error tree of the service. Callers catch the level they mean.

The API layer maps each class to a gRPC status (`api/status.py`); messages are
written for the person reading them and never contain a credential.
"""

from __future__ import annotations


class IngestionError(Exception):
    """Root of every error this service raises on purpose."""


class ConfigurationError(IngestionError):
    """Raised when the process environment is missing or has a bad value."""


class InvalidArgument(IngestionError):
    """Raised when a request field is wrong; `field` names it (JSON spelling)."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class NotFound(IngestionError):
    """Raised when a resource does not exist or the caller may not see it."""


class Conflict(IngestionError):
    """Raised when the resource is in a state that forbids the request."""


class DatabaseConflict(Conflict):
    """Raised when PostgreSQL aborted a transaction to break a deadlock, or for a
    serialization conflict, with concurrent work on the same rows (`db/session.py`
    turns the driver's error into this one). The same transaction again normally
    passes: `db.session.retry_on_conflict`."""

    def __init__(
        self, message: str = "Concurrent work on the same records stopped this change; try again."
    ) -> None:
        super().__init__(message)


class FailedPrecondition(IngestionError):
    """Raised when the instance's settings forbid the request."""


class Unauthenticated(IngestionError):
    """Raised when the caller's credentials are missing or not valid."""


class PermissionDenied(IngestionError):
    """Raised when the caller lacks the permission a method needs."""


class Unavailable(IngestionError):
    """Raised when a dependency (database, broker) cannot be reached now."""


class DatabaseUnavailable(Unavailable):
    """Raised when PostgreSQL cannot be reached: refused, restarting, or the
    connection lost mid-transaction (`db/session.py` turns the driver's error
    into this one)."""

    def __init__(self, message: str = "The database cannot be reached; try again shortly.") -> None:
        super().__init__(message)


class ResourceExhausted(IngestionError):
    """Raised when a request exceeds a limit; `http_status` narrows REST's 429.

    413 for a request too large, 507 when the server's storage is full, 429
    (the default) for too many requests at once. `retry_after` (seconds), when
    known, becomes REST's `Retry-After` header and a gRPC `RetryInfo` detail.
    """

    def __init__(
        self, message: str, http_status: int = 429, *, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.retry_after = retry_after


class ProviderError(IngestionError):
    """Root of the errors raised while talking to a mail provider."""


class ConnectionCheckFailed(ProviderError):
    """Raised when a provider rejects or cannot be reached with a source's settings."""


class ProviderAuthError(ConnectionCheckFailed):
    """Raised when a provider refuses the credentials; retrying will not help."""


class ProviderUnavailable(ProviderError):
    """Raised when a provider cannot be reached now; a later retry may succeed."""


class ProviderDataError(ProviderError):
    """Raised when a source's data cannot be read (a corrupt file); retrying will not help."""


class MailboxUnavailable(ProviderError):
    """Raised by a fetch when one mailbox cannot be read at all (no licence, a
    suspended user, a guest): that mailbox is skipped with this reason, and tried
    again on the next run; the others go on."""
