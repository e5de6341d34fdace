"""The client commands of `ingestion-grpc` (`sources ...`, `import-file`): a running
service driven over gRPC with an API key, with progress for people and plain lines
for scripts. `commands.py` registers them; the rest is one concern a module."""
