"""The ingestion source's life cycle and the operations on it."""
