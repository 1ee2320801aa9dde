"""A protocol-faithful OKX simulator (the server side of the same protocol); never imports ingest.io."""
