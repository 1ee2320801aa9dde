"""The simulator's runtime: live connections, the subscription index, and fan-out of market and private pushes.

A push is rendered once per (channel, target) and queued on every subscribed connection; frame faults are
applied per connection on the way. Depth channels go out in OKX's per-instrument order (bbo-tbt,
books-l2-tbt, books50-l2-tbt, books, books5). `books50-l2-tbt` keeps its own view of the top 50 levels and
its own last seqId, so it pushes only when those 50 levels change and its chain still links message to
message.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import orjson
from aiohttp import web

from ingest.core.ratelimit import SlidingWindow
from ingest.okx import codes
from ingest.okx.channels import (
    BUSINESS_PRIVATE_CHANNELS,
    CONN_CAPPED_CHANNELS,
    PRIVATE_CHANNELS,
    Endpoint,
    SubArg,
    candle_bar,
)
from ingest.okx.signing import verify, ws_login_sign
from ingest.sim import frames
from ingest.sim.account import PrivatePush, ScriptedAccount
from ingest.sim.book import Level, view_diff
from ingest.sim.candles import CandleAcc, CandleMath, bar_next, bar_open
from ingest.sim.clock import LoopTimer, SimClock, SimTimer
from ingest.sim.config import SimConfig
from ingest.sim.faults import Faults, FrameKind
from ingest.sim.market import AggTrade, InstrumentMarket, Market, StepResult
from ingest.sim.session import Conn
from ingest.sim.stats import SimStats

T = TypeVar("T")
Key = tuple[str, str]
_BY_TYPE = frozenset({"liquidation-orders", "instruments"})
_PRIVATE = PRIVATE_CHANNELS | BUSINESS_PRIVATE_CHANNELS
#: Market steps between pushes of slow channels (at 100 ms per step: funding 30 s, open interest 3 s).
FUNDING_EVERY = 300
OPEN_INTEREST_EVERY = 30


class StateWatch:
    """Wakes waiters whenever the simulator's state changes; `wait_for` re-checks a predicate each time, so
    tests wait on conditions instead of sleeping."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    async def wait_for(self, predicate: Callable[[], T | None], timeout: float) -> T:  # noqa: ASYNC109
        """The first truthy value of `predicate()`; TimeoutError after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                value = predicate()
                if value:
                    return value
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.add(fut)
                await fut


@dataclass(frozen=True, slots=True)
class ConnInfo:
    """A read-only view of one connection for tests."""

    conn_id: str
    endpoint: Endpoint
    ip: str
    logged_in: bool
    subscriptions: tuple[SubArg, ...]
    open: bool
    stalled: bool
    close_code: int | None


@dataclass(slots=True)
class _View50:
    bids: list[Level]
    asks: list[Level]
    seq: int
    idle: int = 0


@dataclass(slots=True)
class _CandleTracker:
    acc: CandleAcc | None
    last_id: int


def key_of(sub: SubArg) -> Key:
    """Where a subscription sits in the index: (channel, instId | instType | "")."""
    if sub.channel in _PRIVATE:
        return sub.channel, ""
    if sub.channel in _BY_TYPE:
        return sub.channel, sub.inst_type or ""
    return sub.channel, sub.inst_id or ""


class Hub:
    """Connections, subscriptions and fan-out; owned by `SimServer`."""

    def __init__(self, config: SimConfig, clock: SimClock, market: Market, account: ScriptedAccount,
                 stats: SimStats) -> None:
        self.config = config
        self.clock = clock
        #: What every timed rule reads and sleeps on (`SimConfig.timer`, else the event loop's clock).
        self.timer: SimTimer = config.timer if config.timer is not None else LoopTimer()
        self.market = market
        self.account = account
        self.stats = stats
        self.faults = Faults(self)
        self.watch = StateWatch()
        self.conns: dict[str, Conn] = {}
        self.history: dict[str, Conn] = {}
        self.subs: dict[Key, dict[tuple[Conn, SubArg], None]] = {}
        self._touched: set[Conn] = set()
        self._conn_rng = random.Random(f"{config.seed}/connId")
        self._connect_windows: dict[str, SlidingWindow] = {}
        self._views50: dict[str, _View50] = {}
        self._candles: dict[tuple[str, str], _CandleTracker] = {}
        self._candle_math: dict[str, CandleMath] = {}
        self._indexes: dict[str, str] = {}
        self._last: dict[Key, object] = {}
        account.publish = self.publish_private
        account.publish_trade = self.publish_trade

    # --- connections ------------------------------------------------------------------------------------
    def select(self, endpoint: Endpoint | None, conn_id: str | None) -> list[Conn]:
        return [c for c in self.conns.values()
                if not c.closing and (endpoint is None or c.endpoint is endpoint)
                and (conn_id is None or c.conn_id == conn_id)]

    def info(self, conn: Conn) -> ConnInfo:
        return ConnInfo(conn.conn_id, conn.endpoint, conn.ip, conn.logged_in, tuple(conn.subs), not conn.closed,
                        conn.stalled(), conn.close_code)

    def _new_conn_id(self) -> str:
        while True:
            conn_id = f"{self._conn_rng.getrandbits(32):08x}"
            if conn_id not in self.history:
                return conn_id

    async def ws_handler(self, request: web.Request) -> web.StreamResponse:
        """GET /ws/v5/{public,business,private}: OKX's connect limit, then one `Conn` until it closes."""
        endpoint = Endpoint(request.path)
        ip = request.remote or "unknown"
        self.stats.ws_connect_attempts += 1
        refused = self.faults.take_connect()
        if refused is not None:
            self.stats.ws_connects_refused_by_fault += 1
            return web.Response(status=refused, text="Service Unavailable")
        window = self._connect_windows.get(ip)
        if window is None:
            window = self._connect_windows[ip] = SlidingWindow(self.config.connect_limit,
                                                               self.config.connect_window_s)
        if not window.try_acquire(self.timer.now()):
            # OKX allows 3 connection requests per second per IP; the excess is refused before the upgrade.
            self.stats.ws_connects_rejected += 1
            self.watch.notify()
            return web.Response(status=429, text="Too Many Requests")
        ws = web.WebSocketResponse(autoping=True, compress=self.config.compress,
                                   max_msg_size=self.config.max_frame_bytes, timeout=self.config.ws_close_timeout_s)
        await ws.prepare(request)
        conn = Conn(self, self._new_conn_id(), endpoint, ip, ws, request)
        self.conns[conn.conn_id] = conn
        self.history[conn.conn_id] = conn
        self.stats.connections[conn.conn_id] = conn.stats
        self.stats.ws_connects += 1
        self.watch.notify()
        try:
            await conn.run()
        finally:
            for sub in list(conn.subs):
                self.unindex(conn, sub)
            conn.subs.clear()
            self.conns.pop(conn.conn_id, None)
            self._touched.discard(conn)
            self.watch.notify()
        return ws

    async def close_all(self, code: int = 1001) -> None:
        conns = list(self.conns.values())
        for conn in conns:
            conn.close(code, "simulator stopping")
        if conns:
            await asyncio.wait([asyncio.ensure_future(c.wait_closed()) for c in conns],
                               timeout=self.config.ws_close_timeout_s + 1)
        for conn in list(self.conns.values()):
            conn.abort()

    # --- login ---------------------------------------------------------------------------------------------
    def verify_login(self, arg: dict[str, object]) -> str | None:
        """SPEC 3: the error code for this login arg, or None when it is valid."""
        api_key, passphrase, ts, sign = (arg.get(k) for k in ("apiKey", "passphrase", "timestamp", "sign"))
        self.stats.ws_login_keys.append(str(api_key))
        if not all(isinstance(v, str) for v in (api_key, passphrase, ts, sign)):
            return codes.LOGIN_FAILED
        assert isinstance(ts, str) and isinstance(sign, str)
        try:
            ts_s = float(ts)
        except ValueError:
            return codes.INVALID_TIMESTAMP
        cfg = self.config
        if abs(self.clock.now_ms() / 1000 - ts_s) > cfg.auth_window_s:
            return codes.TIMESTAMP_EXPIRED
        if not cfg.has_credentials or api_key != cfg.api_key:
            return codes.INVALID_API_KEY
        if passphrase != cfg.passphrase:
            return codes.WRONG_PASSPHRASE
        if not verify(ws_login_sign(cfg.api_secret, ts), sign):
            return codes.INVALID_SIGN
        return None

    # --- subscriptions --------------------------------------------------------------------------------------
    def index(self, conn: Conn, sub: SubArg) -> None:
        key = key_of(sub)
        holders = self.subs.setdefault(key, {})
        holders[(conn, sub)] = None
        m = self.market.instruments.get(sub.inst_id or "")
        if sub.channel == "books50-l2-tbt" and m is not None and sub.inst_id not in self._views50:
            self._views50[m.spec.inst_id] = _View50(m.book.top(True, 50), m.book.top(False, 50), m.book_seq)
        bar = candle_bar(sub.channel)
        if bar is not None and sub.channel.startswith("candle") and m is not None \
                and (m.spec.inst_id, bar) not in self._candles:
            self._candles[(m.spec.inst_id, bar)] = self._new_tracker(m, bar)
        if sub.channel == "index-tickers" and sub.inst_id:
            source = self.market.index_source(sub.inst_id)
            if source is not None:
                self._indexes[sub.inst_id] = source.spec.inst_id

    def unindex(self, conn: Conn, sub: SubArg) -> None:
        key = key_of(sub)
        holders = self.subs.get(key)
        if holders is None:
            return
        holders.pop((conn, sub), None)
        if holders:
            return
        del self.subs[key]
        self._last.pop(key, None)
        channel, target = key
        if channel == "books50-l2-tbt":
            self._views50.pop(target, None)
        bar = candle_bar(channel)
        if bar is not None:
            self._candles.pop((target, bar), None)
        if channel == "index-tickers":
            self._indexes.pop(target, None)

    def holders(self, key: Key) -> int:
        return len({c for c, _ in self.subs.get(key, {})})

    def after_subscribe(self, conn: Conn, sub: SubArg) -> None:
        """What OKX sends right after the ack: conn-count events, snapshots, the current value."""
        channel = sub.channel
        if channel in _PRIVATE:
            if channel in CONN_CAPPED_CHANNELS and conn.endpoint is Endpoint.PRIVATE:
                count = self.holders((channel, ""))
                cap = self.config.conn_cap_per_channel
                if count > cap:
                    conn.send_event({"event": "channel-conn-count-error", "channel": channel,
                                     "connCount": str(cap)})
                    conn.subs.pop(sub, None)
                    self.unindex(conn, sub)
                    return
                conn.send_event({"event": "channel-conn-count", "channel": channel, "connCount": str(count)})
            for msg in self.account.snapshots(sub):
                conn.send(orjson.dumps(msg).decode())
            self._touched.add(conn)
            return
        inst = sub.inst_id or ""
        if channel == "index-tickers":
            source_id = self._indexes.get(inst)
            if source_id is not None:
                m = self.market.instruments[source_id]
                self._send_one(conn, frames.index_ticker(inst, m, self._ts(m)), channel, inst)
                self._last[(channel, inst)] = m.index_px()
            return
        m_or_none = self.market.instruments.get(inst)
        if m_or_none is None:
            return
        m = m_or_none
        ts = self._ts(m)
        key = (channel, inst)
        frame: str | None = None
        kind = FrameKind.PUSH
        if channel in ("books", "books-l2-tbt"):
            frame = frames.book_snapshot(m, channel, self.config.book_depth, ts, self._checksum(m))
            kind = FrameKind.SNAPSHOT
        elif channel == "books50-l2-tbt":
            view = self._views50[inst]
            data = {"asks": frames.level_rows(m, view.asks), "bids": frames.level_rows(m, view.bids), "ts": str(ts),
                    "checksum": self._checksum(m), "prevSeqId": -1, "seqId": view.seq}
            frame = frames.dumps({"arg": {"channel": channel, "instId": inst}, "action": "snapshot", "data": [data]})
            kind = FrameKind.SNAPSHOT
        elif channel == "books5":
            frame = frames.books5(m, ts)
            self._last[key] = frames.top_key(m, 5)
        elif channel == "bbo-tbt":
            frame = frames.bbo(m, ts)
            self._last[key] = frames.top_key(m, 1)
        elif channel == "tickers":
            frame = frames.ticker(m, ts)
            self._last[key] = (m.last_px, frames.top_key(m, 1))
        elif channel == "mark-price":
            frame = frames.mark_price(m, ts)
            self._last[key] = m.mark_px()
        elif channel == "funding-rate":
            frame = frames.funding_rate(m, ts)
        elif channel == "open-interest":
            frame = frames.open_interest(m, ts)
            self._last[key] = m.oi
        elif channel == "price-limit":
            frame = frames.price_limit(m, ts)
            self._last[key] = m.price_limits()
        elif (bar := candle_bar(channel)) is not None and channel.startswith("candle"):
            tracker = self._candles.get((inst, bar))
            # Bring the running candle up to date for everyone; if that pushed it, the new subscriber has it.
            if tracker is not None and not self._advance_candle(m, bar, tracker, ts) and tracker.acc is not None:
                frame = frames.candle(channel, inst, self._math(m).row(tracker.acc, confirm=False))
        if frame is not None:
            self._send_one(conn, frame, channel, inst, kind)

    def _ts(self, m: InstrumentMarket) -> int:
        return m.ts or self.market.next_ts()

    def _checksum(self, m: InstrumentMarket) -> int:
        return frames.checksum_of(m) if self.config.checksum else 0

    def _math(self, m: InstrumentMarket) -> CandleMath:
        math = self._candle_math.get(m.spec.inst_id)
        if math is None:
            math = self._candle_math[m.spec.inst_id] = CandleMath(m.spec)
        return math

    # --- delivery -----------------------------------------------------------------------------------------
    def _send_one(self, conn: Conn, frame: str, channel: str, inst_id: str,
                  kind: FrameKind = FrameKind.PUSH) -> None:
        if self.faults.frame_rules:
            out = self.faults.apply_frame(conn, channel, inst_id, kind, frame)
            if out is None:
                return
            frame = out
        conn.send(frame)
        self._touched.add(conn)

    def deliver(self, key: Key, frame: str, inst_id: str, kind: FrameKind = FrameKind.PUSH) -> None:
        """Queue `frame` on every connection subscribed to `key`."""
        holders = self.subs.get(key)
        if not holders:
            return
        rules = self.faults.frame_rules
        touched = self._touched
        for conn, _ in holders:
            if rules:
                out = self.faults.apply_frame(conn, key[0], inst_id, kind, frame)
                if out is None:
                    continue
                conn.send(out)
            else:
                conn.send(frame)
            touched.add(conn)

    def deliver_many(self, key: Key, batch: list[str] | tuple[str, ...], inst_id: str) -> int:
        """Queue several frames on every subscriber of `key`; returns frames x connections queued."""
        holders = self.subs.get(key)
        if not holders or not batch:
            return 0
        if self.faults.frame_rules:
            for frame in batch:
                self.deliver(key, frame, inst_id)
        else:
            for conn, _ in holders:
                conn.send_many(batch)
                self._touched.add(conn)
        return len(batch) * len(holders)

    async def flush(self) -> None:
        """Wait until every frame queued so far was written to its socket (at most `flush_timeout_s`, so a
        client that stopped reading cannot hang a test: OKX would close it with 4005 anyway)."""
        touched, self._touched = self._touched, set()
        waits = [asyncio.ensure_future(c.flushed()) for c in touched if not c.closed]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=self.config.flush_timeout_s)
            for fut in pending:
                fut.cancel()

    # --- market fan-out -------------------------------------------------------------------------------------
    def dispatch(self, results: list[StepResult]) -> None:
        """Render and queue the pushes of one market step."""
        subs = self.subs
        for r in results:
            m = self.market.instruments[r.inst_id]
            inst = r.inst_id
            if r.agg and ("trades", inst) in subs:
                self.deliver_many(("trades", inst), frames.trades(m, r.agg), inst)
            if ("trades-all", inst) in subs:
                lo = m.log.index_of_id(r.first_trade_id)
                if lo < len(m.log):
                    self.deliver_many(("trades-all", inst), frames.trades_all(m, lo, len(m.log)), inst)
            self._dispatch_depth(m, r)
            self._dispatch_prices(m, r)
            for liq in r.liquidations:
                self.deliver(("liquidation-orders", m.spec.inst_type), frames.liquidation(m, liq), inst)
            if r.instrument_changed:
                self.deliver(("instruments", m.spec.inst_type), frames.instrument(m), inst)
        if self.config.private_snapshot_every_ticks and self.market.steps % self.config.private_snapshot_every_ticks \
                == 0:
            self._periodic_snapshots()

    def _dispatch_depth(self, m: InstrumentMarket, r: StepResult) -> None:
        inst, subs, ts = r.inst_id, self.subs, r.ts
        if ("bbo-tbt", inst) in subs:
            top = frames.top_key(m, 1)
            if top != self._last.get(("bbo-tbt", inst)) or r.heartbeat:
                self._last[("bbo-tbt", inst)] = top
                self.deliver(("bbo-tbt", inst), frames.bbo(m, ts), inst)
        l2 = ("books-l2-tbt", inst) in subs
        b400 = ("books", inst) in subs
        view = self._views50.get(inst)
        checksum = 0
        if self.config.checksum and (r.book_update or view is not None) and (l2 or b400 or view is not None):
            checksum = frames.checksum_of(m)
        asks: list[list[str]] = []
        bids: list[list[str]] = []
        if r.book_update and (l2 or b400):
            asks = frames.level_rows(m, frames.sorted_delta(r.delta_asks, False))
            bids = frames.level_rows(m, frames.sorted_delta(r.delta_bids, True))
        if l2 and r.book_update:
            self.deliver(("books-l2-tbt", inst), frames.book_update("books-l2-tbt", inst, asks, bids, ts, checksum,
                                                                    r.prev_seq, r.seq), inst, FrameKind.UPDATE)
        if view is not None:
            new_bids, new_asks = m.book.top(True, 50), m.book.top(False, 50)
            d_bids = sorted(view_diff(view.bids, new_bids), reverse=True)
            d_asks = sorted(view_diff(view.asks, new_asks))
            view.idle += 1
            if d_bids or d_asks or r.reset:
                frame = frames.book_update("books50-l2-tbt", inst, frames.level_rows(m, d_asks),
                                           frames.level_rows(m, d_bids), ts, checksum, view.seq, r.seq)
                view.bids, view.asks, view.seq, view.idle = new_bids, new_asks, r.seq, 0
                self.deliver(("books50-l2-tbt", inst), frame, inst, FrameKind.UPDATE)
            elif view.idle >= self.config.heartbeat_ticks:
                # its own heartbeat: the 50 levels can stay still while deeper levels change
                view.idle = 0
                frame = frames.book_update("books50-l2-tbt", inst, [], [], ts, checksum, view.seq, view.seq)
                self.deliver(("books50-l2-tbt", inst), frame, inst, FrameKind.UPDATE)
        if b400 and r.book_update:
            self.deliver(("books", inst), frames.book_update("books", inst, asks, bids, ts, checksum, r.prev_seq,
                                                             r.seq), inst, FrameKind.UPDATE)
        if ("books5", inst) in subs:
            top5 = frames.top_key(m, 5)
            if top5 != self._last.get(("books5", inst)) or r.heartbeat:
                self._last[("books5", inst)] = top5
                self.deliver(("books5", inst), frames.books5(m, ts), inst)

    def _dispatch_prices(self, m: InstrumentMarket, r: StepResult) -> None:
        inst, subs, ts, last = r.inst_id, self.subs, r.ts, self._last
        if ("tickers", inst) in subs:
            state = (m.last_px, frames.top_key(m, 1))
            if r.agg or state != last.get(("tickers", inst)):
                last[("tickers", inst)] = state
                self.deliver(("tickers", inst), frames.ticker(m, ts), inst)
        for (t_inst, bar), tracker in self._candles.items():
            if t_inst == inst:
                self._advance_candle(m, bar, tracker, ts, push=True)
        if ("mark-price", inst) in subs and m.mark_px() != last.get(("mark-price", inst)):
            last[("mark-price", inst)] = m.mark_px()
            self.deliver(("mark-price", inst), frames.mark_price(m, ts), inst)
        for index_id, source in self._indexes.items():
            if source == inst and m.index_px() != last.get(("index-tickers", index_id)):
                last[("index-tickers", index_id)] = m.index_px()
                self.deliver(("index-tickers", index_id), frames.index_ticker(index_id, m, ts), index_id)
        steps = self.market.steps
        if ("funding-rate", inst) in subs and steps % FUNDING_EVERY == 0:
            self.deliver(("funding-rate", inst), frames.funding_rate(m, ts), inst)
        if ("open-interest", inst) in subs and steps % OPEN_INTEREST_EVERY == 0 \
                and m.oi != last.get(("open-interest", inst)):
            last[("open-interest", inst)] = m.oi
            self.deliver(("open-interest", inst), frames.open_interest(m, ts), inst)
        if ("price-limit", inst) in subs and m.price_limits() != last.get(("price-limit", inst)):
            last[("price-limit", inst)] = m.price_limits()
            self.deliver(("price-limit", inst), frames.price_limit(m, ts), inst)

    # --- candles -------------------------------------------------------------------------------------------
    def _new_tracker(self, m: InstrumentMarket, bar: str) -> _CandleTracker:
        ts = self._ts(m)
        acc = self._math(m).build(m.log, bar_open(ts, bar), bar)
        return _CandleTracker(acc, m.log.ids[-1] if len(m.log) else 0)

    def _advance_candle(self, m: InstrumentMarket, bar: str, tracker: _CandleTracker, ts: int,
                        push: bool = True) -> bool:
        """Fold the trades since the tracker's last id into the running candle; push the closed bar with
        confirm "1" when a bar ends, and the running one when it changed. True when it changed."""
        math = self._math(m)
        channel = f"candle{bar}"
        log = m.log
        changed = False
        for i in range(log.index_after_id(tracker.last_id), len(log)):
            px, sz, t = log.px[i], log.sz[i], log.ts[i]
            acc = tracker.acc
            if acc is None or t >= bar_next(acc.open_ms, bar):
                if acc is not None and push:
                    self.deliver((channel, m.spec.inst_id), frames.candle(channel, m.spec.inst_id,
                                                                          math.row(acc, confirm=True)),
                                 m.spec.inst_id)
                acc = tracker.acc = CandleAcc(bar_open(t, bar), px, px, px, px)
            acc.add(px, sz, math.inverse_term(px, sz))
            tracker.last_id = log.ids[i]
            changed = True
        acc = tracker.acc
        if acc is not None and ts >= bar_next(acc.open_ms, bar):
            if push:
                self.deliver((channel, m.spec.inst_id), frames.candle(channel, m.spec.inst_id,
                                                                      math.row(acc, confirm=True)), m.spec.inst_id)
            acc = tracker.acc = CandleAcc(bar_open(ts, bar), acc.c, acc.c, acc.c, acc.c)
            changed = True
        if changed and push and tracker.acc is not None:
            self.deliver((channel, m.spec.inst_id), frames.candle(channel, m.spec.inst_id,
                                                                  math.row(tracker.acc, confirm=False)),
                         m.spec.inst_id)
        return changed

    # --- private -------------------------------------------------------------------------------------------
    def publish_trade(self, inst_id: str, trade: AggTrade) -> None:
        """A trade made by a scripted fill: pushed on `trades` and `trades-all` at once."""
        m = self.market.instruments[inst_id]
        self.deliver_many(("trades", inst_id), frames.trades(m, [trade]), inst_id)
        lo = m.log.index_of_id(trade.trade_id)
        self.deliver_many(("trades-all", inst_id), frames.trades_all(m, lo, lo + 1), inst_id)

    async def publish_private(self, pushes: list[PrivatePush]) -> None:
        for push in pushes:
            for conn, arg in list(self.subs.get((push.channel, ""), {})):
                msg = self.account.render(push, arg)
                if msg is not None:
                    self._send_one(conn, orjson.dumps(msg).decode(), push.channel, arg.inst_id or "")
        await self.flush()

    def _periodic_snapshots(self) -> None:
        for channel in ("account", "positions"):
            for conn, arg in list(self.subs.get((channel, ""), {})):
                if _update_interval(arg) == "0":
                    continue
                for msg in self.account.snapshots(arg):
                    self._send_one(conn, orjson.dumps(msg).decode(), channel, arg.inst_id or "")


def _update_interval(arg: SubArg) -> str | None:
    if not arg.extra_params:
        return None
    try:
        params = orjson.loads(arg.extra_params)
    except orjson.JSONDecodeError:
        return None
    value = params.get("updateInterval") if isinstance(params, dict) else None
    return str(value) if value is not None else None
