"""`ingestion-grpc`: run the stack or one of its parts, or create a user.

ingestion-grpc run                                  the whole stack (make run)
ingestion-grpc server                               the gRPC server alone
ingestion-grpc worker --processes 2 --threads 4     a Dramatiq worker alone
ingestion-grpc scheduler                            the scheduler alone
ingestion-grpc envoy --upstream 10.0.0.5:50051 ...  Envoy alone, before gRPC servers
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
from ingestion_grpc.errors import ConfigurationError, IngestionError


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


def _worker(args: argparse.Namespace) -> int:
    from ingestion_grpc.jobs.worker import worker_command, worker_environment

    # Dramatiq takes this process over (exec): signals, exit code and the process
    # group are its own, exactly as for a worker the stack starts.
    command = worker_command(threads=args.threads, processes=args.processes)
    os.execve(command[0], command, worker_environment(os.environ, args.threads))


def _envoy(args: argparse.Namespace) -> int:
    from ingestion_grpc.config import parse_port
    from ingestion_grpc.envoy_config import envoy_command, parse_upstreams, render_envoy_config

    try:
        if args.upstream:
            upstreams = [u for given in args.upstream for u in parse_upstreams(given, "--upstream")]
        else:
            given = os.environ.get("GRPC_UPSTREAMS", "").strip()
            if not given:
                raise ConfigurationError("GRPC_UPSTREAMS (or --upstream host:port) is not set")
            upstreams = parse_upstreams(given, "GRPC_UPSTREAMS")
        http_host = os.environ.get("HTTP_HOST", "0.0.0.0").strip() or "0.0.0.0"
        http_port = parse_port(os.environ.get("HTTP_PORT", "8080"), "HTTP_PORT", allow_zero=False)
        admin_port = parse_port(os.environ.get("ENVOY_ADMIN_PORT", "0"), "ENVOY_ADMIN_PORT")
        metrics_port = parse_port(os.environ.get("METRICS_PORT", "0"), "METRICS_PORT")
    except (ConfigurationError, ValueError) as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    data_dir = Path(os.environ.get("DATA_DIR", "./data")).resolve()
    try:
        config = render_envoy_config(
            http_host,
            http_port,
            upstreams[0].port,
            admin_port,
            data_dir / "envoy.yaml",
            metrics_port=metrics_port,
            upstreams=upstreams,
        )
        command = envoy_command(config)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"envoy on {http_host}:{http_port} in front of {', '.join(map(str, upstreams))}", flush=True
    )
    os.execv(command[0], command)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 up, got {text!r}")
    return int(text)


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
    worker = commands.add_parser(
        "worker", help="run a Dramatiq worker alone (the import jobs of this node)"
    )
    worker.add_argument("--processes", type=_positive, default=1, help="worker processes")
    worker.add_argument("--threads", type=_positive, default=4, help="threads per process")
    worker.set_defaults(handler=_worker)
    commands.add_parser("scheduler", help="run the scheduler alone").set_defaults(
        handler=_scheduler
    )
    envoy = commands.add_parser(
        "envoy", help="run Envoy alone, in front of one or more gRPC servers"
    )
    envoy.add_argument(
        "--upstream",
        action="append",
        metavar="HOST:PORT",
        help="a gRPC server (repeat, or comma-separate; default: GRPC_UPSTREAMS)",
    )
    envoy.set_defaults(handler=_envoy)
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
