"""okx-ingest: OKX streams into Kafka as validated Avro."""
