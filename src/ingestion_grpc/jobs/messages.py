"""Names shared by the senders (API server, scheduler) and the actors.

Senders build messages from these names instead of importing the actors, so
the API server never loads worker code and the broker stays its own object.
"""

from __future__ import annotations

QUEUE = "ingestion"
IMPORT_SOURCE = "import_source"
SYNC_SOURCE = "sync_source"
INGEST_MAILBOX = "ingest_mailbox"
