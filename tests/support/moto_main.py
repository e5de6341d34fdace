"""`moto_server` as `tests/support/s3.py` starts it, made cheaper per request.

Run as `python moto_main.py HOST PORT`. The same application, request handler and
threaded werkzeug server as moto's own `moto_server` command, less three costs
that say nothing about S3 (measured on moto 5.2.5: 4.4 ms of CPU per PUT before):

- moto lists and stats the ~180 folders of its own package twice per request to
  route it (`moto.backends.list_of_moto_modules`, about 2 ms); the list cannot
  change while the server runs, so it is read once;
- werkzeug writes a log line for every request (errors are still logged);
- `moto_server` runs the application in debug mode.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import Any

from moto import backends
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import run_simple


class QuietRequestHandler(MotoRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


def _exit(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    modules = tuple(backends.list_of_moto_modules())
    backends.list_of_moto_modules = lambda: modules
    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    run_simple(
        host,
        port,
        DomainDispatcherApplication(create_backend_app),
        threaded=True,
        request_handler=QuietRequestHandler,
    )


if __name__ == "__main__":
    main()
