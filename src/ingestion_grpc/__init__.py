"""Email-archive ingestion service: a gRPC server, transcoded to REST by Envoy."""
