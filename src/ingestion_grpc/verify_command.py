"""`ingestion-grpc verify [SOURCE_ID]`: re-read the archive and report what is
missing or damaged (`archive/verify.py`), with a progress bar on a terminal and
plain lines on a pipe. Exit 0: every blob is whole; 1: some are missing or
damaged; 2: bad usage or configuration (an unknown source, a bad ARCHIVE_URL,
no database, a blob store that cannot be used)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import inspect
from sqlalchemy.exc import SQLAlchemyError

from ingestion_grpc.archive import verify
from ingestion_grpc.archive.blobstore import BlobStore, blob_store_at
from ingestion_grpc.client.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from ingestion_grpc.client.output import Output
from ingestion_grpc.config import archive_location
from ingestion_grpc.db.models import ArchivedEmail
from ingestion_grpc.db.session import Database
from ingestion_grpc.errors import ConfigurationError, NotFound, Unavailable

PLAIN_EVERY_SECONDS = 5.0


def run(
    database_url: str,
    data_dir: Path,
    source_id: str | None,
    output: Output,
    environ: Mapping[str, str] = os.environ,
) -> int:
    try:
        store = blob_store_at(*archive_location(environ, data_dir), data_dir)
    except ConfigurationError as error:
        output.error(str(error))
        return EXIT_USAGE
    database = Database(database_url)
    try:
        return _run(database, store, source_id, output)
    except (NotFound, Unavailable) as error:  # Unavailable: the blob store cannot be used
        output.error(str(error))
        return EXIT_USAGE
    except SQLAlchemyError as error:
        # The driver's message, first line only: never the URL (it may hold a password).
        reason = str(getattr(error, "orig", None) or error).splitlines()[0]
        output.error(f"cannot read the catalog: {reason}")
        return EXIT_USAGE
    finally:
        database.dispose()


def _run(database: Database, store: BlobStore, source_id: str | None, output: Output) -> int:
    if not inspect(database.engine).has_table(ArchivedEmail.__tablename__):
        output.error("this database has no archive catalog (has the service ever run on it?)")
        return EXIT_USAGE
    if source_id is not None:
        verify.check_source(database, source_id)
    blobs, total_bytes = verify.catalog_totals(database, source_id)
    scope = f"source {source_id}" if source_id else "every source"
    output.line(f"verifying {blobs} blobs ({total_bytes} bytes) of {scope}")
    if output.is_terminal:
        with Progress(
            TextColumn("blobs"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[problems]} problems"),
            TimeElapsedColumn(),
            console=output.console,
        ) as progress:
            task = progress.add_task("blobs", total=blobs, problems=0)

            def show(report: verify.Report, problem: verify.BlobProblem | None) -> None:
                if problem is not None:
                    progress.console.print(problem.line(), markup=False, highlight=False)
                progress.update(task, completed=report.blobs_checked, problems=len(report.problems))

            report = verify.verify(database, store, source_id, on_blob=show)
    else:
        printed_at = time.monotonic()

        def show_plain(report: verify.Report, problem: verify.BlobProblem | None) -> None:
            nonlocal printed_at
            if problem is not None:
                output.line(problem.line())
            if time.monotonic() - printed_at >= PLAIN_EVERY_SECONDS:
                output.line(f"progress: {report.blobs_checked} of {blobs} blobs checked")
                printed_at = time.monotonic()

        report = verify.verify(database, store, source_id, on_blob=show_plain)
    output.line(report.summary())
    return EXIT_FAILED if report.problems else EXIT_OK
