"""Observability: logging, metrics, Sentry."""
