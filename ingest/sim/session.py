"""One simulated OKX WebSocket connection: OKX's request protocol and an ordered, bounded outbound queue.

Everything a connection says goes through `send()` into one queue drained by one writer task, so acks,
errors, pushes and the final close frame leave in the order they were produced, and a fault (stall, drop,
notice) acts on that single path. Request handling is synchronous: a subscribe is acked and its snapshot
queued without yielding, so a market step can never fall between the snapshot and the next update.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson
from aiohttp import WSMsgType, web

from ingest.core.ratelimit import SlidingWindow
from ingest.okx import codes
from ingest.okx.channels import (
    INST_TYPE_CHANNELS,
    LOGIN_PUBLIC_CHANNELS,
    PRIVATE_CHANNELS,
    Endpoint,
    SubArg,
    endpoint_for,
    requires_login,
)
from ingest.sim.stats import ConnStats

if TYPE_CHECKING:
    from ingest.sim.hub import Hub

Json = dict[str, object]

MIGRATED_MSG = ("This channel has been migrated to the '/business' URL. Please subscribe using the new URL. More "
                "details can refer to: https://www.okx.com/help-center/changes-to-v5-api-websocket-subscription-"
                "parameter-and-url")
NOT_ON_BUSINESS_MSG = 'This channel is not supported by "/business" URL. Please use "/private" or "/public" URL(s).'
L2TBT_CONFLICT_MSG = ("books-l2-tbt cannot be subscribed together with books or books50-l2-tbt for the same "
                      "instId on one connection.")
LOGIN_MESSAGES: dict[str, str] = {
    codes.INVALID_TIMESTAMP: "Invalid timestamp",
    codes.INVALID_API_KEY: "Invalid apiKey",
    codes.TIMESTAMP_EXPIRED: "Timestamp request expired",
    codes.INVALID_SIGN: "Invalid sign",
    codes.LOGIN_FAILED: "Login failed.",
    codes.WRONG_PASSPHRASE: "Wrong passphrase",
    codes.API_KEY_NOT_EXIST: "API key doesn't exist",
    codes.LOGIN_INTERNAL: "Login failed due to internal error. Please try again later.",
    codes.REPEATED_LOGIN: "The WebSocket endpoint does not allow multiple or repeated logins.",
}
_TYPES_FOR: dict[str, frozenset[str]] = {
    "liquidation-orders": frozenset({"SWAP", "FUTURES", "MARGIN", "OPTION"}),
    "instruments": frozenset({"SPOT", "MARGIN", "SWAP", "FUTURES", "OPTION"}),
}
_ANY_TYPES = frozenset({"SPOT", "MARGIN", "SWAP", "FUTURES", "OPTION", "ANY"})
_DERIVATIVE_ONLY = frozenset({"funding-rate", "open-interest"})
_NO_TARGET = frozenset({"account", "balance_and_position", "fills", "liquidation-warning", "account-greeks",
                        "status"})
#: Channels OKX has that the simulator acks (on the right endpoint) but never pushes.
_ACK_ONLY = frozenset({"opt-summary", "estimated-price"})


def wrong_url_msg(channel: str, arg: Json) -> str:
    if channel in INST_TYPE_CHANNELS:
        target = f"instType:{arg.get('instType', '')}"
    else:
        target = f"instId:{arg.get('instId', '')}"
    return (f"Wrong URL or channel:{channel},{target} doesn't exist. Please use the correct URL, channel and "
            "parameters referring to API document.")


@dataclass(frozen=True, slots=True)
class _Close:
    code: int
    reason: str


class Conn:
    """A live connection: its login, its subscriptions, its outbound queue and its timers."""

    def __init__(self, hub: Hub, conn_id: str, endpoint: Endpoint, ip: str, ws: web.WebSocketResponse,
                 request: web.Request) -> None:
        self.hub = hub
        self.config = hub.config
        self.conn_id = conn_id
        self.endpoint = endpoint
        self.ip = ip
        self.ws = ws
        self.request = request
        self.timer = hub.timer
        self.stats = ConnStats(conn_id, endpoint, ip)
        self.subs: dict[SubArg, dict[str, str]] = {}
        self.logged_in = False
        self.last_sent = self.timer.now()
        #: 0: not stalled; else the timer's time until which nothing is sent (inf: until unstalled).
        self.stalled_until = 0.0
        self.closing = False
        self.closed = False
        self.close_code: int | None = None
        self.budget = SlidingWindow(self.config.request_budget, self.config.request_budget_window_s)
        self._queue: deque[str | _Close] = deque()
        self._wake = asyncio.Event()
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._done = asyncio.Event()
        self._timers: list[asyncio.Task[None]] = []

    def __hash__(self) -> int:
        return id(self)

    # --- output ------------------------------------------------------------------------------------------
    def stalled(self) -> bool:
        if not self.stalled_until:
            return False
        now = self.timer.now()
        if now < self.stalled_until:
            return True
        self.stalled_until = 0.0
        self.last_sent = now
        return False

    def send(self, frame: str) -> None:
        """Queue one text frame (dropped while stalled; a full queue closes with 4005 as OKX does)."""
        if self.closing:
            return
        if self.stalled_until and self.stalled():
            self.stats.frames_dropped += 1
            return
        if len(self._queue) >= self.config.max_queue_frames:
            self._overflow(1)
            return
        self._queue.append(frame)
        self._flushed.clear()
        self._wake.set()

    def send_many(self, batch: list[str] | tuple[str, ...]) -> None:
        """Queue many frames at once (the benchmark's fast path); same rules as `send`."""
        if self.closing or not batch:
            return
        if self.stalled_until and self.stalled():
            self.stats.frames_dropped += len(batch)
            return
        if len(self._queue) + len(batch) > self.config.max_queue_frames:
            self._overflow(len(batch))
            return
        self._queue.extend(batch)
        self._flushed.clear()
        self._wake.set()

    def _overflow(self, incoming: int) -> None:
        """A reader too slow for OKX's buffer: what waits for it is discarded (counted, never sent) and the
        connection closes with 4005 after what the socket already took; it sends nothing more."""
        self.stats.frames_overflowed += len(self._queue) + incoming
        self._queue.clear()
        self.close(codes.CLOSE_BUFFER_FULL, "Buffer is full, cannot write data.")
        self.hub.watch.notify()

    def send_event(self, event: Json, req_id: object = None) -> None:
        """An event frame (ack, error, login, notice...) with the request `id` first and `connId` last."""
        msg: Json = {"id": req_id} if isinstance(req_id, str) else {}
        msg.update(event)
        msg["connId"] = self.conn_id
        self.send(orjson.dumps(msg).decode())

    def error(self, code: str, msg: str, req_id: object = None) -> None:
        self.send_event({"event": "error", "code": code, "msg": msg}, req_id)

    def close(self, code: int, reason: str) -> None:
        """Close after what is already queued (the close itself is never stalled)."""
        if self.closing:
            return
        self.closing = True
        self._queue.append(_Close(code, reason))
        self._flushed.clear()
        self._wake.set()

    def abort(self) -> None:
        """Cut the TCP connection with no close frame: the client sees 1006."""
        self.closing = True
        self.close_code = 1006
        transport = self.request.transport
        if transport is not None:
            transport.abort()
        self._queue.clear()
        self._flushed.set()

    def schedule_close(self, delay_s: float, code: int, reason: str) -> None:
        """Close `delay_s` from now on the simulator's timer (cancelled if the connection ends first)."""
        due = self.timer.now() + delay_s  # from now, not from when the task first runs

        async def close_later() -> None:
            await self.timer.sleep(due - self.timer.now())
            self.close(code, reason)

        self._timers.append(asyncio.create_task(close_later(), name=f"sim-close-{self.conn_id}"))

    async def flushed(self) -> None:
        """Return once everything queued so far was written to the socket (or the connection is gone)."""
        await self._flushed.wait()

    async def _writer(self) -> None:
        ws, stats, queue = self.ws, self.stats, self._queue
        try:
            while True:
                if not queue:
                    self._flushed.set()
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                item = queue.popleft()
                if isinstance(item, _Close):
                    queue.clear()
                    self.close_code = item.code
                    self.stats.close_code, self.stats.close_reason = item.code, item.reason
                    self._flushed.set()
                    await ws.close(code=item.code, message=item.reason.encode())
                    return
                await ws.send_str(item)
                stats.frames_sent += 1
                stats.bytes_sent += len(item)
                self.last_sent = self.timer.now()
        except (ConnectionError, RuntimeError):
            self.closing = True
        finally:
            self._flushed.set()

    async def _idle_watch(self) -> None:
        """OKX's rule: nothing pushed for `idle_timeout_s` (30 s) -> close 4004. Suspended while stalled."""
        timeout, timer = self.config.idle_timeout_s, self.timer
        while not self.closing:
            now = timer.now()
            if self.stalled():
                wait = self.stalled_until - now
                await timer.sleep(timeout if math.isinf(wait) else min(wait, timeout))
                continue
            due = self.last_sent + timeout
            if self._queue:
                due = max(due, now + timeout / 10)
            if now >= due:
                self.close(codes.CLOSE_IDLE, "No data received in 30s.")
                return
            await timer.sleep(due - now)

    # --- lifecycle -----------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve the connection until it closes; owns its writer and idle-watch tasks."""
        writer = asyncio.create_task(self._writer(), name=f"sim-writer-{self.conn_id}")
        idle = asyncio.create_task(self._idle_watch(), name=f"sim-idle-{self.conn_id}")
        try:
            async for msg in self.ws:
                if msg.type is WSMsgType.TEXT:
                    self.handle_text(msg.data)
                elif msg.type is WSMsgType.BINARY:
                    self.error(codes.INVALID_REQUEST, "Invalid request: binary frame")
                if self.closing and writer.done():
                    break
        finally:
            self.closing = True
            for pending in self._timers:
                pending.cancel()
            idle.cancel()
            if not writer.done():
                self._wake.set()
                writer.cancel()
            await asyncio.gather(writer, idle, *self._timers, return_exceptions=True)
            if self.close_code is None:
                self.close_code = self.ws.close_code
            self.stats.close_code = self.close_code
            self.closed = True
            self._flushed.set()
            self._done.set()

    async def wait_closed(self) -> int | None:
        await self._done.wait()
        return self.close_code

    # --- requests ------------------------------------------------------------------------------------------
    def handle_text(self, text: str) -> None:
        """One client text frame: `ping`, or a JSON request (login / subscribe / unsubscribe)."""
        if text == "ping":
            self.stats.pings += 1
            self.send("pong")
            self.hub.watch.notify()
            return
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError:
            self.error(codes.INVALID_REQUEST, f"Invalid request: {text}")
            return
        if not isinstance(msg, dict):
            self.error(codes.INVALID_REQUEST, f"Invalid request: {text}")
            return
        req_id = msg.get("id")
        if req_id is not None and not (isinstance(req_id, str) and 1 <= len(req_id) <= 32 and req_id.isalnum()):
            self.error(codes.INVALID_REQUEST, f"Invalid request: {text}")
            return
        op = msg.get("op")
        if op not in ("subscribe", "unsubscribe", "login"):
            self.error(codes.INVALID_OP, f"Invalid op: {op}", req_id)
            return
        self.stats.requests += 1
        if not self.budget.try_acquire(self.timer.now()):
            self.stats.budget_violations += 1
            self.error(codes.REQUESTS_TOO_FREQUENT, "Requests too frequent", req_id)
            if self.config.close_on_budget_exceeded:
                self.close(codes.CLOSE_INVALID_REQUEST, "Requests too frequent")
            self.hub.watch.notify()
            return
        args = msg.get("args")
        if not isinstance(args, list) or not args or not all(isinstance(a, dict) for a in args):
            self.error(codes.INVALID_REQUEST, f"Invalid request: {text}", req_id)
            return
        if op == "login":
            self.stats.logins += 1
            self._login(args, req_id)
        else:
            if op == "subscribe":
                self.stats.subscribes += 1
            else:
                self.stats.unsubscribes += 1
            for arg in args:
                self._sub(op, arg, req_id)
        self.hub.watch.notify()

    def _login(self, args: list[Json], req_id: object) -> None:
        if self.config.reject_repeated_login and self.logged_in:
            self._login_failed(codes.REPEATED_LOGIN, req_id)
            return
        forced = self.hub.faults.take_login(self.timer.now())
        if forced is not None:
            self._login_failed(forced, req_id)
            return
        for arg in args:
            code = self.hub.verify_login(arg)
            if code is not None:
                self._login_failed(code, req_id)
                return
        self.logged_in = True
        self.send_event({"event": "login", "code": "0", "msg": ""}, req_id)

    def _login_failed(self, code: str, req_id: object) -> None:
        self.error(code, LOGIN_MESSAGES.get(code, "Login failed."), req_id)
        if self.config.close_on_login_failure:
            self.close(codes.CLOSE_LOGIN_FAILED, "Login failed.")

    def _check(self, arg: Json) -> tuple[str, str] | None:
        """OKX's refusal of one arg on this endpoint as (code, msg), or None when it is acceptable."""
        channel = arg.get("channel")
        if not isinstance(channel, str) or not channel:
            return codes.INVALID_ARGS, "Invalid args"
        home = endpoint_for(channel)
        if home is None:
            return codes.WRONG_URL_OR_CHANNEL, wrong_url_msg(channel, arg)
        if home is not self.endpoint:
            if home is Endpoint.BUSINESS and self.endpoint is Endpoint.PUBLIC:
                return codes.MIGRATED_TO_BUSINESS, MIGRATED_MSG
            if self.endpoint is Endpoint.BUSINESS:
                return codes.NOT_ON_BUSINESS, NOT_ON_BUSINESS_MSG
            return codes.WRONG_URL_OR_CHANNEL, wrong_url_msg(channel, arg)
        if channel in _ACK_ONLY or channel.startswith(("mark-price-candle", "index-candle")):
            return None
        inst_id, inst_type = arg.get("instId"), arg.get("instType")
        if (inst_id is not None and not isinstance(inst_id, str)) or (inst_type is not None and not isinstance(
                inst_type, str)):
            return codes.INVALID_ARGS, "Invalid args"
        market = self.hub.market
        if channel in INST_TYPE_CHANNELS:
            if not inst_type:
                return codes.INVALID_ARGS, "Invalid args"
            if inst_type not in _TYPES_FOR.get(channel, _ANY_TYPES):
                return codes.WRONG_URL_OR_CHANNEL, wrong_url_msg(channel, arg)
            if inst_id and inst_id not in market.instruments:
                return codes.WRONG_URL_OR_CHANNEL, wrong_url_msg(channel, {**arg, "instType": inst_id})
            return None
        if channel in _NO_TARGET or channel in PRIVATE_CHANNELS:
            if inst_id and inst_id not in market.instruments:
                return codes.WRONG_URL_OR_CHANNEL, wrong_url_msg(channel, arg)
            return None
        if not inst_id:
            return codes.INVALID_ARGS, "Invalid args"
        if channel == "index-tickers":
            return None if market.index_source(inst_id) else (codes.WRONG_URL_OR_CHANNEL,
                                                               wrong_url_msg(channel, arg))
        m = market.instruments.get(inst_id)
        if m is None or (channel in _DERIVATIVE_ONLY and not m.spec.is_derivative):
            return codes.WRONG_URL_OR_CHANNEL, wrong_url_msg(channel, arg)
        if channel == "funding-rate" and m.spec.inst_type != "SWAP":
            return codes.WRONG_URL_OR_CHANNEL, wrong_url_msg(channel, arg)
        return None

    def _sub(self, op: str, arg: Json, req_id: object) -> None:
        refusal = self._check(arg)
        if refusal is not None:
            self.error(*refusal, req_id)
            return
        sub = SubArg.from_okx(arg)
        echo = {k: v for k, v in arg.items() if isinstance(v, str)}
        if op == "unsubscribe":
            if self.subs.pop(sub, None) is not None:
                self.hub.unindex(self, sub)
            self.send_event({"event": "unsubscribe", "arg": echo}, req_id)
            return
        if requires_login(sub.channel) and not self.logged_in:
            if sub.channel in LOGIN_PUBLIC_CHANNELS and self.config.l2tbt_ack_before_login_error:
                self.send_event({"event": "subscribe", "arg": echo}, req_id)
            self.error(codes.PLEASE_LOG_IN, "Please log in", req_id)
            return
        if sub.channel in ("books", "books50-l2-tbt") and SubArg("books-l2-tbt", sub.inst_id) in self.subs:
            self.error(codes.L2TBT_CONFLICT, L2TBT_CONFLICT_MSG, req_id)
            return
        self.send_event({"event": "subscribe", "arg": echo}, req_id)
        if sub.channel == "books-l2-tbt":
            # OKX keeps books-l2-tbt and silently drops books/books50-l2-tbt of the same instId (2024-07-17).
            for other in ("books", "books50-l2-tbt"):
                dropped = SubArg(other, sub.inst_id)
                if self.subs.pop(dropped, None) is not None:
                    self.hub.unindex(self, dropped)
        if sub in self.subs:
            self.hub.unindex(self, sub)
        self.subs[sub] = echo
        self.hub.index(self, sub)
        self.hub.after_subscribe(self, sub)
