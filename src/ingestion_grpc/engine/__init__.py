"""The ingestion engine: runs, per-mailbox work, the scheduler and the watchdog.

Providers only read mail; everything about jobs, state, checkpoints,
deduplication and storage lives here and in `archive/`.
"""
