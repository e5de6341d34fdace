"""Why a client command stops, and the exit status a script gets for it."""

from __future__ import annotations

import grpc

EXIT_OK = 0
# The run failed (or was paused), or the service could not do what was asked.
EXIT_FAILED = 1
# Bad usage: the command line, its file, its id or its API key must be fixed.
EXIT_USAGE = 2
# Interrupted (Ctrl-C): the run itself goes on in the service.
EXIT_INTERRUPTED = 130

# Answers that mean "fix the command", not "the service failed". FAILED_PRECONDITION
# is what the source cannot do at all (a sync of a file source); ABORTED (a run
# under way, a paused source) may pass, so it stays a failure (1).
_USAGE_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


class CommandError(Exception):
    """Raised when a command cannot go on; `exit_code` is what the process returns."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(CommandError):
    """Raised when the command line or what it names is wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)


def from_rpc(error: grpc.RpcError, target: str) -> CommandError:
    """What the service answered, for people (its message never holds a secret)."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else None) or code.name
    if code == grpc.StatusCode.UNAVAILABLE:
        return CommandError(f"the service at {target} is unavailable: {details}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return UsageError(f"the API key was refused: {details}")
    return CommandError(details, EXIT_USAGE if code in _USAGE_CODES else EXIT_FAILED)
