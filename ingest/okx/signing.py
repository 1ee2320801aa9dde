"""OKX request signing, pure: HMAC-SHA256 for WebSocket login and REST (SPEC sections 3 and 8.1).

Time is always passed in, never read here, so the caller decides which clock (and which
server-time offset) a signature uses.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime

WS_LOGIN_PATH = "/users/self/verify"


def _b64_hmac(secret: str, message: str) -> str:
    digest = hmac.new(secret.encode(), message.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def ws_login_timestamp(epoch_ms: int) -> str:
    """The login timestamp: Unix epoch seconds as a string of an integer (the official SDK's form)."""
    return str(epoch_ms // 1000)


def ws_login_sign(secret: str, timestamp: str) -> str:
    """Base64(HMAC_SHA256(secret, timestamp + "GET" + "/users/self/verify"))."""
    return _b64_hmac(secret, f"{timestamp}GET{WS_LOGIN_PATH}")


def rest_timestamp(epoch_ms: int) -> str:
    """ISO-8601 UTC with milliseconds and a Z, e.g. 2020-12-08T09:08:57.715Z."""
    dt = datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


def parse_rest_timestamp(value: str) -> int:
    """Epoch ms of an OK-ACCESS-TIMESTAMP; raises ValueError unless it has the exact ISO-8601 ms Z form."""
    if len(value) != 24 or not value.endswith("Z") or value[19] != ".":
        raise ValueError(f"not an ISO-8601 millisecond UTC timestamp: {value!r}")
    dt = datetime.strptime(value[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    return int(dt.timestamp()) * 1000 + int(value[20:23])


def rest_prehash(timestamp: str, method: str, request_path: str, body: str = "") -> str:
    """timestamp + METHOD + requestPath (with the query string exactly as sent) + body."""
    return f"{timestamp}{method.upper()}{request_path}{body}"


def rest_sign(secret: str, timestamp: str, method: str, request_path: str, body: str = "") -> str:
    """The OK-ACCESS-SIGN header value."""
    return _b64_hmac(secret, rest_prehash(timestamp, method, request_path, body))


def verify(expected_sign: str, given_sign: str) -> bool:
    """Constant-time comparison, for the simulator's checks."""
    return hmac.compare_digest(expected_sign.encode(), given_sign.encode())
