"""OKX hosts per environment. Port-443 WebSocket URLs by default (SPEC addendum 2026-11)."""

from __future__ import annotations

import enum

from ingest.okx.channels import Endpoint


class Environment(enum.StrEnum):
    """Production or demo (paper) trading."""

    PRODUCTION = "production"
    DEMO = "demo"


WS_BASE: dict[Environment, str] = {
    Environment.PRODUCTION: "wss://ws.okx.com",
    Environment.DEMO: "wss://wspap.okx.com",
}
REST_BASE = "https://openapi.okx.com"
DEMO_HEADER = ("x-simulated-trading", "1")


def ws_url(env: Environment, endpoint: Endpoint, base: str | None = None) -> str:
    """The WebSocket URL of `endpoint`; `base` (scheme://host[:port]) overrides the environment's host."""
    return f"{(base or WS_BASE[env]).rstrip('/')}{endpoint.value}"
