"""Which provider class serves which `provider` name."""

from __future__ import annotations

from ingestion_grpc.errors import InvalidArgument
from ingestion_grpc.providers.base import Provider
from ingestion_grpc.providers.eml import EmlImport
from ingestion_grpc.providers.google_workspace import GoogleWorkspace
from ingestion_grpc.providers.imap import GenericImap
from ingestion_grpc.providers.mbox import MboxImport
from ingestion_grpc.providers.microsoft_365 import Microsoft365
from ingestion_grpc.providers.pst import PstImport

PROVIDERS: dict[str, type[Provider]] = {
    cls.name: cls
    for cls in (GoogleWorkspace, Microsoft365, GenericImap, PstImport, EmlImport, MboxImport)
}


def register(cls: type[Provider]) -> None:
    """Add a provider (a plug-in named by PROVIDER_PLUGINS) under its `name`."""
    PROVIDERS[cls.name] = cls


def provider_class(name: str, field: str = "provider") -> type[Provider]:
    """The class for `name`, or InvalidArgument naming `field`."""
    try:
        return PROVIDERS[name]
    except KeyError:
        raise InvalidArgument(field, f"must be one of {', '.join(PROVIDERS)}") from None
