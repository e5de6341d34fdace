"""Which file source a local file makes, told by its content with the providers' own
format checks (the same ones the service runs before it imports the file)."""

from __future__ import annotations

from pathlib import Path

from ingestion_grpc.client.errors import UsageError
from ingestion_grpc.errors import InvalidArgument
from ingestion_grpc.providers.base import ProviderEnvironment
from ingestion_grpc.providers.eml import EmlImport
from ingestion_grpc.providers.files import LOCAL, FileImport
from ingestion_grpc.providers.mbox import MboxImport
from ingestion_grpc.providers.pst import PstImport

# Cheapest and most certain first: a PST's magic number, a zip's directory, then
# mbox, which accepts any file whose first line that is not blank starts "From ".
FILE_IMPORTS: tuple[type[FileImport], ...] = (PstImport, EmlImport, MboxImport)


def file_provider(path: Path) -> str:
    """`pst_import`, `eml_import` (a zip of .eml files) or `mbox_import`, or UsageError."""
    if not path.is_file():
        raise UsageError(f"{path}: not a file" if path.exists() else f"{path}: no such file")
    real = path.resolve()
    environment = ProviderEnvironment(import_root=real.parent, upload_root=real.parent)
    for cls in FILE_IMPORTS:
        provider = cls({LOCAL: real.name}, environment)
        try:
            provider.check_format(provider.source())
        except InvalidArgument as refused:
            if "not readable" in str(refused):
                raise UsageError(f"{path}: not readable") from None
            continue
        return cls.name
    raise UsageError(f"{path}: neither a PST file, a zip of .eml files nor an mbox file")
