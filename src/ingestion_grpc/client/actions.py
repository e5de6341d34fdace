"""What each client command does (`commands.py` parses their command lines)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ingestion_grpc.client.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    CommandError,
    UsageError,
)
from ingestion_grpc.client.filetypes import file_provider
from ingestion_grpc.client.output import Output
from ingestion_grpc.client.progress import follow, summary, wait_for_first_run
from ingestion_grpc.client.service import Service
from ingestion_grpc.config import ClientSettings
from ingestion_grpc.errors import ConfigurationError

Handler = Callable[[argparse.Namespace, Service, Output], int]


def run(command: str, args: argparse.Namespace) -> int:
    """Run `command` with a connection to the service; errors become exit codes."""
    handler = HANDLERS[command]
    output = Output()
    try:
        service = Service(ClientSettings.from_env(url=args.url, api_key=args.api_key))
    except ConfigurationError as error:
        output.error(str(error))
        return UsageError(str(error)).exit_code
    except CommandError as error:
        output.error(str(error))
        return error.exit_code
    try:
        return handler(args, service, output)
    except CommandError as error:
        output.error(str(error))
        return error.exit_code
    except KeyboardInterrupt:
        output.error("interrupted; the service carries on with what was started")
        return EXIT_INTERRUPTED
    finally:
        service.close()


def _json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message)


def _when(message: Message, field: str) -> str:
    if not message.HasField(field):
        return ""
    moment = getattr(message, field).ToDatetime(tzinfo=UTC)
    return str(moment.isoformat(timespec="seconds").replace("+00:00", "Z"))


def _list(args: argparse.Namespace, service: Service, output: Output) -> int:
    sources = service.list_sources()
    if args.json:
        print(json.dumps([_json(s) for s in sources], indent=2))
        return EXIT_OK
    output.table(
        ("ID", "NAME", "PROVIDER", "STATUS", "LAST RUN FINISHED"),
        [(s.id, s.name, s.provider, s.status, _when(s, "last_sync_finished_at")) for s in sources],
    )
    return EXIT_OK


def _show(args: argparse.Namespace, service: Service, output: Output) -> int:
    source = service.get_source(args.id)
    run = service.latest_run(source.id)
    if args.json:
        shown = _json(source)
        if run is not None:
            shown["latestRun"] = _json(run)
        print(json.dumps(shown, indent=2))
        return EXIT_OK
    for label, value in (
        ("id", source.id),
        ("name", source.name),
        ("provider", source.provider),
        ("status", source.status),
        ("created", _when(source, "created_at")),
        ("last run started", _when(source, "last_sync_started_at")),
        ("last run finished", _when(source, "last_sync_finished_at")),
        ("last message", source.last_sync_status_message),
    ):
        if value:
            output.line(f"{label}: {value}")
    if run is not None:
        output.line(f"latest run: {run.id} ({run.kind}) {summary(run)}")
    return EXIT_OK


def _config(args: argparse.Namespace) -> dict[str, Any]:
    if args.config is not None:
        text, where = args.config, "--config"
    else:
        where = "--config-file"
        try:
            text = (
                sys.stdin.read() if args.config_file == "-" else Path(args.config_file).read_text()
            )
        except OSError as error:
            raise UsageError(f"--config-file: {error.strerror}") from None
    try:
        config = json.loads(text)
    except ValueError:
        raise UsageError(f"{where}: not valid JSON") from None
    if not isinstance(config, dict):
        raise UsageError(f"{where}: must be a JSON object")
    return config


def _create(args: argparse.Namespace, service: Service, output: Output) -> int:
    source = service.create_source(args.name, args.provider, _config(args))
    output.line(f"created source {source.id} ({source.provider}): {source.status}")
    if not args.watch:
        return EXIT_OK
    return follow(service, source.id, wait_for_first_run(service, source.id).id, output)


def _watch(args: argparse.Namespace, service: Service, output: Output) -> int:
    source = service.get_source(args.id)
    run = service.latest_run(source.id)
    if run is None:
        output.line(f"source {source.id} has no run yet ({source.status})")
        return EXIT_OK
    return follow(service, source.id, run.id, output)


def _pause(args: argparse.Namespace, service: Service, output: Output) -> int:
    source = service.pause(args.id)
    output.line(f"source {source.id}: {source.status}")
    return EXIT_OK


def _resume(args: argparse.Namespace, service: Service, output: Output) -> int:
    source = service.resume(args.id)
    output.line(f"source {source.id}: {source.status}")
    return EXIT_OK


def _sync(args: argparse.Namespace, service: Service, output: Output) -> int:
    run_id = service.sync(args.id)
    output.line(f"sync {run_id} of source {args.id} started")
    return follow(service, args.id, run_id, output) if args.watch else EXIT_OK


def _import_file(args: argparse.Namespace, service: Service, output: Output) -> int:
    path: Path = args.path
    provider = file_provider(path)
    size = path.stat().st_size
    output.line(f"uploading {path.name} ({size} bytes) as {provider}")
    if output.is_terminal:
        with Progress(
            TextColumn("upload"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=output.console,
        ) as bar:
            task = bar.add_task("upload", total=size)
            uploaded = service.upload(path, lambda sent: bar.advance(task, sent))
    else:
        uploaded = service.upload(path, lambda sent: None)
    output.line(f"uploaded {path.name}")
    source = service.create_source(args.name or path.name, provider, {"uploadedFilePath": uploaded})
    output.line(f"created source {source.id} ({provider}): {source.status}")
    if args.no_wait:
        return EXIT_OK
    return follow(service, source.id, wait_for_first_run(service, source.id).id, output)


HANDLERS: dict[str, Handler] = {
    "list": _list,
    "show": _show,
    "create": _create,
    "watch": _watch,
    "pause": _pause,
    "resume": _resume,
    "sync": _sync,
    "import_file": _import_file,
}
