"""`ingestion-grpc`: run the stack or one of its parts, or create a user.

ingestion-grpc run                                  the whole stack (make run)
ingestion-grpc server                               the gRPC server alone
ingestion-grpc scheduler                            the scheduler alone
ingestion-grpc create-user EMAIL --role user        prompts for the password
ingestion-grpc verify [SOURCE_ID]                   re-read and check every archived blob

and the client commands of a running service (`client/commands.py`):
ingestion-grpc sources list|show|create|watch|pause|resume|sync ...
ingestion-grpc import-file PATH
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from ingestion_grpc.auth.permissions import Role
from ingestion_grpc.auth.services import create_user
from ingestion_grpc.client import commands as client_commands
from ingestion_grpc.db.migrate import upgrade_to_head
from ingestion_grpc.db.session import Database
from ingestion_grpc.errors import IngestionError


@contextlib.contextmanager
def _database_url() -> Iterator[str]:
    """DATABASE_URL, or the embedded PostgreSQL that `make run` uses under DATA_DIR."""
    if os.environ.get("DATABASE_URL", "").strip():
        yield os.environ["DATABASE_URL"]
        return
    from ingestion_grpc.stack import embedded_services

    data_dir = Path(os.environ.get("DATA_DIR", "./data")).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    # Only PostgreSQL is needed: a placeholder keeps the embedded Redis off.
    with embedded_services(data_dir, {"REDIS_URL": "unused"}) as urls:
        yield urls["DATABASE_URL"]


def _create_user(args: argparse.Namespace) -> int:
    password = os.environ.get("NEW_USER_PASSWORD") or getpass.getpass("Password: ")
    with _database_url() as url:
        database = Database(url)
        try:
            upgrade_to_head(database.engine)
            with database.unit_of_work() as uow:
                user = create_user(uow, args.email, password, Role(args.role))
                uow.commit()
        except IngestionError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        finally:
            database.dispose()
    print(f"created {user.role} {user.email} ({user.id})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from ingestion_grpc import verify_command
    from ingestion_grpc.client.output import Output

    data_dir = Path(os.environ.get("DATA_DIR", "./data")).resolve()
    with _database_url() as url:
        return verify_command.run(url, data_dir, args.source_id, Output())


def _run(args: argparse.Namespace) -> int:
    from ingestion_grpc.stack import run_stack

    return run_stack()


def _server(args: argparse.Namespace) -> int:
    from ingestion_grpc.server import main as serve

    serve()
    return 0


def _scheduler(args: argparse.Namespace) -> int:
    import signal

    from ingestion_grpc import bootstrap
    from ingestion_grpc.db.migrate import upgrade_to_head
    from ingestion_grpc.engine.scheduler import run_forever
    from ingestion_grpc.stop_request import StopRequest

    settings = bootstrap.settings_or_exit()
    bootstrap.configure_logging(settings)
    bootstrap.configure_metrics(settings)
    ctx = bootstrap.engine_context(settings, bootstrap.job_queue(settings))
    # The scheduler may start before any server: the schema must exist first.
    upgrade_to_head(ctx.database.engine)
    with StopRequest().installed((signal.SIGTERM, signal.SIGINT)) as stopping:
        run_forever(ctx, settings.scheduler_tick.total_seconds(), stopping)
    ctx.database.dispose()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ingestion-grpc")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="start the whole stack in the foreground").set_defaults(
        handler=_run
    )
    commands.add_parser("server", help="run the gRPC server alone").set_defaults(handler=_server)
    commands.add_parser("scheduler", help="run the scheduler alone").set_defaults(
        handler=_scheduler
    )
    user = commands.add_parser(
        "create-user",
        help="create a user (password from NEW_USER_PASSWORD or a prompt)",
    )
    user.add_argument("email")
    user.add_argument("--role", choices=[r.value for r in Role], default=Role.USER.value)
    user.set_defaults(handler=_create_user)
    checked = commands.add_parser(
        "verify",
        help="re-read every archived blob and check its SHA-256 and size against the catalog",
    )
    checked.add_argument("source_id", nargs="?", help="only this source's blobs")
    checked.set_defaults(handler=_verify)
    client_commands.register(commands)
    args = parser.parse_args(argv)
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
