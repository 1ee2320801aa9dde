"""Observability: structured redacting logs, Prometheus metrics, Sentry, health endpoints."""
