"""`ingestion-grpc sources ...` and `ingestion-grpc import-file`: registered in cli.py.

ingestion-grpc sources list [--json]
ingestion-grpc sources show ID [--json]
ingestion-grpc sources create --name NAME --provider P (--config JSON | --config-file F) [--watch]
ingestion-grpc sources watch ID                     follow the current (or last) run
ingestion-grpc sources pause|resume ID
ingestion-grpc sources sync ID [--watch]
ingestion-grpc import-file PATH [--name NAME] [--no-wait]

Each takes --url (or INGESTION_URL; default http://localhost:8080, Envoy) and
--api-key (or INGESTION_API_KEY). Exit status: 0 done, 1 the run failed (or the
service could not do it), 2 bad usage, 130 interrupted (the run goes on).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _lazy(command: str) -> Callable[[argparse.Namespace], int]:
    """The command, run from `actions.py`, imported only when a client command runs
    (gRPC stubs and rich stay out of `ingestion-grpc run` and the other parts)."""

    def run(args: argparse.Namespace) -> int:
        from ingestion_grpc.client import actions

        return actions.run(command, args)

    return run


def register(commands: Any) -> None:
    """Add the client commands to `ingestion-grpc`'s subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        help="the service: http://host:port (Envoy), https://host or host:port "
        "(default: INGESTION_URL, else http://localhost:8080)",
    )
    common.add_argument(
        "--api-key",
        help="API key to act with (default: INGESTION_API_KEY; prefer the variable, "
        "other users can see a process's arguments)",
    )

    sources = commands.add_parser("sources", help="list, show, create and drive sources")
    verbs = sources.add_subparsers(dest="sources_command", required=True, metavar="COMMAND")

    listing = verbs.add_parser("list", parents=[common], help="every source you can see")
    listing.add_argument("--json", action="store_true", help="JSON, as the REST API writes it")
    listing.set_defaults(handler=_lazy("list"))

    show = verbs.add_parser("show", parents=[common], help="one source and its latest run")
    show.add_argument("id")
    show.add_argument("--json", action="store_true", help="JSON, as the REST API writes it")
    show.set_defaults(handler=_lazy("show"))

    create = verbs.add_parser(
        "create", parents=[common], help="create a source (its import starts at once)"
    )
    create.add_argument("--name", required=True)
    create.add_argument("--provider", required=True, help="e.g. generic_imap, mbox_import")
    config = create.add_mutually_exclusive_group(required=True)
    config.add_argument("--config", help="providerConfig as a JSON object")
    config.add_argument(
        "--config-file", help="a file holding providerConfig as JSON ('-': standard input)"
    )
    create.add_argument("--watch", action="store_true", help="follow the import until it ends")
    create.set_defaults(handler=_lazy("create"))

    watch = verbs.add_parser(
        "watch", parents=[common], help="follow the source's current run until it ends"
    )
    watch.add_argument("id")
    watch.set_defaults(handler=_lazy("watch"))

    for verb, text in (
        ("pause", "pause a source (a running job stops at its next batch)"),
        ("resume", "resume a paused source (an interrupted run continues)"),
    ):
        parser = verbs.add_parser(verb, parents=[common], help=text)
        parser.add_argument("id")
        parser.set_defaults(handler=_lazy(verb))

    sync = verbs.add_parser("sync", parents=[common], help="start a sync of a source now")
    sync.add_argument("id")
    sync.add_argument("--watch", action="store_true", help="follow the sync until it ends")
    sync.set_defaults(handler=_lazy("sync"))

    upload = commands.add_parser(
        "import-file",
        parents=[common],
        help="upload an mbox, PST or EML zip file and import it, with progress",
    )
    upload.add_argument("path", type=Path)
    upload.add_argument("--name", help="the source's name (default: the file's name)")
    upload.add_argument("--no-wait", action="store_true", help="return once the import is queued")
    upload.set_defaults(handler=_lazy("import_file"))
