"""What the simulator counted: connections, WebSocket requests, REST requests and every limit violation.

Tests assert on these to prove a client stayed inside OKX's limits (`stats.violations == 0`) rather than
merely that it worked.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from ingest.okx.channels import Endpoint


@dataclass(slots=True)
class ConnStats:
    """Counters of one WebSocket connection; `requests` is what OKX's 480/hour budget counts."""

    conn_id: str
    endpoint: Endpoint
    ip: str
    requests: int = 0
    logins: int = 0
    subscribes: int = 0
    unsubscribes: int = 0
    pings: int = 0
    budget_violations: int = 0
    frames_sent: int = 0
    bytes_sent: int = 0
    frames_dropped: int = 0
    #: Frames discarded when the outbound buffer overflowed (`max_queue_frames`, then close 4005).
    frames_overflowed: int = 0
    close_code: int | None = None
    close_reason: str = ""


@dataclass(frozen=True, slots=True)
class RestRecord:
    """One REST request as answered: HTTP status and OKX `code` ("" when the body had none), and whether it
    asked for demo trading."""

    method: str
    path: str
    query: str
    status: int
    code: str
    key: str
    #: Whether the request carried `x-simulated-trading: 1` (demo trading).
    demo: bool = False


@dataclass(slots=True)
class SimStats:
    """All counters; reset nothing, read anything."""

    ws_connect_attempts: int = 0
    ws_connects: int = 0
    #: Upgrades refused because the client exceeded 3 connects per second per IP (a client violation).
    ws_connects_rejected: int = 0
    #: Upgrades refused by a fault (not a client violation).
    ws_connects_refused_by_fault: int = 0
    connections: dict[str, ConnStats] = field(default_factory=dict)
    rest_requests: Counter[str] = field(default_factory=Counter)
    #: Requests beyond an endpoint's limit, per path (answered 50011).
    rest_violations: Counter[str] = field(default_factory=Counter)
    #: Answers made by a fault (5xx, injected 50011), per path.
    rest_injected: Counter[str] = field(default_factory=Counter)
    #: Highest number of admitted requests seen inside one window, per path.
    rest_peak: dict[str, int] = field(default_factory=dict)
    rest_log: deque[RestRecord] = field(default_factory=lambda: deque(maxlen=10_000))
    #: The apiKey of every WebSocket login attempt, in order (which key was used when).
    ws_login_keys: list[str] = field(default_factory=list)

    @property
    def ws_budget_violations(self) -> int:
        return sum(c.budget_violations for c in self.connections.values())

    @property
    def violations(self) -> int:
        """Every limit a client broke: connect rate, per-connection request budget, REST limits."""
        return self.ws_connects_rejected + self.ws_budget_violations + sum(self.rest_violations.values())

    def ws_requests(self, conn_id: str) -> int:
        return self.connections[conn_id].requests

    def rest_count(self, path: str) -> int:
        return self.rest_requests[path]
