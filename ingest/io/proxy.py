"""Which proxy an OKX connection goes through: the `okx.proxy` setting, else HTTPS_PROXY/NO_PROXY.

The REST client (httpx) and the WebSocket client (websockets) both get the answer from here, explicitly, rather
than each reading the environment its own way: httpx's `trust_env` also reads `.netrc` and `SSL_CERT_FILE`, and
websockets follows the environment unless told otherwise. Both open a CONNECT tunnel, so TLS (certificate
verification and SPKI pins) stays end to end with OKX; a TLS-inspecting proxy needs `okx.ca_bundle`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import urlsplit

DIRECT = "direct"


def _env(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name.lower()) or env.get(name.upper())
    return value or None


def proxy_for(url: str, setting: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The proxy URL for `url` (https/wss or http/ws), or None to connect directly.

    `setting` is `okx.proxy`: a URL wins, 'direct' means none; unset, the environment decides like curl does
    (https_proxy/HTTPS_PROXY for https and wss, http_proxy/HTTP_PROXY for http and ws, then ALL_PROXY;
    no_proxy/NO_PROXY lists hosts or domain suffixes that bypass it, `*` all).
    """
    if setting == DIRECT:
        return None
    if setting is not None:
        return setting
    env = os.environ if env is None else env
    parts = urlsplit(url)
    secure = parts.scheme in ("https", "wss")
    proxy = _env(env, "https_proxy" if secure else "http_proxy") or _env(env, "all_proxy")
    if proxy is None:
        return None
    no_proxy = _env(env, "no_proxy")
    if no_proxy and bypassed(parts.hostname or "", parts.port, no_proxy):
        return None
    return proxy


def bypassed(host: str, port: int | None, no_proxy: str) -> bool:
    """Whether NO_PROXY exempts `host`: `*`, the host itself, a parent domain (`okx.com`, `.okx.com`), or
    `host:port`."""
    host = host.lower().rstrip(".")
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if entry_port and (not entry_port.isdigit() or port is None or int(entry_port) != port):
            continue
        name = name.lstrip(".").rstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


def describe_proxy(proxy: str | None) -> str:
    """The proxy for logs: scheme, host and port only (userinfo may hold a password)."""
    if proxy is None:
        return DIRECT
    parts = urlsplit(proxy)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"
