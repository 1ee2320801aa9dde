"""Thin I/O adapters: WebSocket, REST, Kafka, journal, broker process."""
