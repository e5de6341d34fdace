"""Engine, sessions and the unit of work that owns each transaction."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import ParamSpec, TypeVar

import psycopg
import tenacity
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.orm import Session, sessionmaker

from ingestion_grpc.errors import DatabaseConflict, DatabaseUnavailable

# SQLSTATEs that mean "no server to talk to": connection exceptions (class 08),
# and a server shutting down, crashed, or still starting up.
_UNREACHABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03")
# A transaction PostgreSQL aborted so that a concurrent one could go on: a
# deadlock, a serialization failure. Its docs advise running it again.
_CONFLICT_SQLSTATES = ("40P01", "40001")

_P = ParamSpec("_P")
_T = TypeVar("_T")


def sqlalchemy_url(database_url: str) -> str:
    """Use the psycopg 3 driver whatever scheme the URL was given with."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+psycopg://" + database_url[len(prefix) :]
    return database_url


def make_engine(database_url: str) -> Engine:
    engine = create_engine(sqlalchemy_url(database_url), pool_pre_ping=True, pool_size=10)
    event.listen(engine, "handle_error", _translated, retval=True)
    return engine


def _translated(context: ExceptionContext) -> DatabaseUnavailable | DatabaseConflict | None:
    """The driver's errors that callers act on, as our own; others stay as they are."""
    sqlstate = getattr(context.original_exception, "sqlstate", None)
    if sqlstate in _CONFLICT_SQLSTATES:
        return DatabaseConflict()
    return _unreachable(context)


def _unreachable(context: ExceptionContext) -> DatabaseUnavailable | None:
    """A database that cannot be reached becomes DatabaseUnavailable (503 for the
    API; for a worker, a cue to hand its mailbox back once the database answers).
    Other errors (a constraint, a bad statement) stay as they are.

    SQLAlchemy invalidates a broken connection before raising this, so the next
    unit of work gets a new one.
    """
    if context.is_pre_ping:
        return None  # the pool tries one new connection by itself first
    error = context.original_exception
    sqlstate = getattr(error, "sqlstate", None)
    if context.is_disconnect or (
        isinstance(error, psycopg.OperationalError)
        and (sqlstate is None or sqlstate.startswith(_UNREACHABLE_SQLSTATES))
    ):
        return DatabaseUnavailable()
    return None


def retry_on_conflict(transaction: Callable[_P, _T]) -> Callable[_P, _T]:
    """Run `transaction` (a whole unit of work, from its start to its commit) again
    when PostgreSQL aborted it for a deadlock with concurrent work: a source deleted
    while a worker or the scheduler updates its runs, say. A third abort is the
    caller's DatabaseConflict (409)."""
    retrying = tenacity.retry(
        retry=tenacity.retry_if_exception_type(DatabaseConflict),
        stop=tenacity.stop_after_attempt(3),
        wait=tenacity.wait_random(0.05, 0.25),
        reraise=True,
    )
    return retrying(transaction)


def ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


class UnitOfWork:
    """One transaction: rolled back on exit unless `commit()` was called.

    Callbacks registered with `after_commit` run only once the commit has
    succeeded, so a job is never sent for a row a worker could not yet see.
    """

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory
        self._after_commit: list[Callable[[], None]] = []

    def __enter__(self) -> UnitOfWork:
        self.session = self._session_factory()
        self._after_commit = []
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # close() rolls back whatever was not committed and detaches the
        # objects with their loaded values, which the caller may still read.
        self.session.close()

    def fresh(self) -> UnitOfWork:
        """Another, independent unit of work on the same database (use with `with`)."""
        return UnitOfWork(self._session_factory)

    def after_commit(self, callback: Callable[[], None]) -> None:
        self._after_commit.append(callback)

    def commit(self) -> None:
        self.session.commit()
        callbacks, self._after_commit = self._after_commit, []
        for callback in callbacks:
            callback()


class Database:
    """The engine and a factory of units of work over it."""

    def __init__(self, database_url: str) -> None:
        self.engine = make_engine(database_url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def unit_of_work(self) -> UnitOfWork:
        return UnitOfWork(self._sessions)

    def dispose(self) -> None:
        self.engine.dispose()
