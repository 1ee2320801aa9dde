"""SimConfig: everything a test or the CLI can tune, with OKX's real values as defaults.

Every timeout and rate window is here so tests can shrink them (an idle close after 0.2 s instead of 30 s)
without sleeping; `rate_window_scale` shrinks all rate windows at once.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ingest.sim.clock import SimTimer


@dataclass(frozen=True, slots=True)
class RestLimit:
    """At most `limit` requests per `window_s` seconds; `per` says whose budget ("ip", "ip+instType", "key")."""

    limit: int
    window_s: float
    per: str = "ip"


#: SPEC 8.3 rate limits of the REST endpoints the simulator serves.
REST_LIMITS: Mapping[str, RestLimit] = {
    "/api/v5/public/time": RestLimit(10, 2.0),
    "/api/v5/public/instruments": RestLimit(20, 2.0, "ip+instType"),
    "/api/v5/market/trades": RestLimit(100, 2.0),
    "/api/v5/market/history-trades": RestLimit(20, 2.0),
    "/api/v5/market/candles": RestLimit(40, 2.0),
    "/api/v5/market/history-candles": RestLimit(20, 2.0),
    "/api/v5/market/books": RestLimit(40, 2.0),
    "/api/v5/trade/fills": RestLimit(60, 2.0, "key"),
    "/api/v5/trade/fills-history": RestLimit(10, 2.0, "key"),
    "/api/v5/trade/orders-history": RestLimit(40, 2.0, "key"),
    "/api/v5/trade/orders-pending": RestLimit(60, 2.0, "key"),
    "/api/v5/account/balance": RestLimit(10, 2.0, "key"),
    "/api/v5/account/positions": RestLimit(10, 2.0, "key"),
    "/api/v5/account/config": RestLimit(5, 2.0, "key"),
    # OKX v5 docs (not in SPEC 8.3): 10 requests per 2 s per IP and instId.
    "/api/v5/public/funding-rate-history": RestLimit(10, 2.0, "ip+instId"),
}


class RateLimitHttp(enum.StrEnum):
    """How a REST rate-limit violation (50011) is answered; OKX does both, so `ALTERNATE` is the default."""

    HTTP_429 = "429"
    HTTP_200 = "200"
    ALTERNATE = "alternate"


class KeyEnv(enum.StrEnum):
    """Which environment the configured API key belongs to (a mismatch with `x-simulated-trading` is 50101)."""

    LIVE = "live"
    DEMO = "demo"


@dataclass(frozen=True, slots=True)
class SimConfig:
    """The simulator's settings. Credentials default to empty: private logins and signed REST then fail."""

    instruments: tuple[str, ...] = ("BTC-USDT", "ETH-USDT", "BTC-USDT-SWAP")
    seed: int = 1
    #: None: manual mode (tests call `await sim.tick(n)`); otherwise a tick loop at this interval.
    auto_tick_s: float | None = None
    api_key: str = ""
    api_secret: str = ""
    passphrase: str = ""
    key_env: KeyEnv = KeyEnv.LIVE
    #: `perm` of GET /api/v5/account/config: "read_only", "read_only,trade", "read_only,withdraw,trade".
    perm: str = "read_only"
    uid: str = "44705892343619584"

    # time
    #: Injected wall clock (epoch ms); default time.time_ns() // 1e6. The clock-offset fault skews it.
    wall_ms: Callable[[], int] | None = None
    #: Injected monotonic timer of every timed rule (idle close, stalls, notices, rate windows, the tick loop);
    #: default the event loop's. A test shares a fake one with the client to run both on fake time.
    timer: SimTimer | None = None
    #: When set, market timestamps are virtual: start_ms + step * tick_ms, fully reproducible.
    start_ms: int | None = None
    tick_ms: int = 100
    #: Login and REST signatures must be within this many seconds of the simulator clock.
    auth_window_s: float = 30.0

    # WebSocket rules (SPEC 2)
    idle_timeout_s: float = 30.0
    notice_close_after_s: float = 60.0
    notice_close_code: int = 1001
    max_frame_bytes: int = 64 * 1024
    request_budget: int = 480
    request_budget_window_s: float = 3600.0
    #: On the 481st request: error 60014, then close 4002 (True) or only the error (False).
    close_on_budget_exceeded: bool = True
    connect_limit: int = 3
    connect_window_s: float = 1.0
    conn_cap_per_channel: int = 30
    #: OKX acked books-l2-tbt before sending 60011 (ccxt#12995); private channels get only the error.
    l2tbt_ack_before_login_error: bool = True
    close_on_login_failure: bool = False
    reject_repeated_login: bool = False
    compress: bool = True
    #: Frames waiting for a slow reader before the connection is closed with 4005 (buffer full).
    max_queue_frames: int = 50_000
    #: How long `tick()` waits for a connection that stopped reading before returning anyway.
    flush_timeout_s: float = 10.0
    ws_close_timeout_s: float = 2.0

    # market
    checksum: bool = False
    book_depth: int = 400
    #: Steps without a book change before an empty heartbeat update (OKX: about 60 s = 600 steps of 100 ms).
    heartbeat_ticks: int = 600
    takers_per_tick: float = 0.6
    maker_changes_per_tick: int = 6
    max_trades_history: int = 2_000_000
    #: Funding settles every this many ms of market time (OKX: 8 h, shortened to 6/4/2/1 h for volatile SWAPs).
    funding_interval_ms: int = 8 * 3600 * 1000

    # private
    initial_balances: tuple[tuple[str, str], ...] = (("USDT", "10000"), ("BTC", "0.5"))
    private_page_size: int = 100
    #: Send every order push this many extra times (OKX may repeat pushes; SPEC 6 dedupe rules).
    repeat_order_pushes: int = 0
    #: Periodic account/positions snapshots every N ticks unless the arg has updateInterval "0" (0: never).
    private_snapshot_every_ticks: int = 0

    # REST
    rest_limits: Mapping[str, RestLimit] = field(default_factory=dict)
    rate_window_scale: float = 1.0
    rate_limit_http: RateLimitHttp = RateLimitHttp.ALTERNATE

    def rest_limit(self, path: str) -> RestLimit | None:
        """The effective limit of `path` (override, else SPEC), windows scaled by `rate_window_scale`."""
        base = self.rest_limits.get(path) or REST_LIMITS.get(path)
        if base is None:
            return None
        return RestLimit(base.limit, base.window_s * self.rate_window_scale, base.per)

    @property
    def has_credentials(self) -> bool:
        return bool(self.api_key and self.api_secret and self.passphrase)
