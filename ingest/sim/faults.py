"""Fault injection, composable: every fault is either an immediate action on matching connections or a rule
that the next matching frames, logins, upgrades or REST requests consume.

Selectors: `endpoint` (an `Endpoint`, its path, or "public"/"business"/"private"; None = all) and `conn_id`
(None = all). Rules with a `count` apply that many times, then vanish; several rules stack, so a chaos test
can combine a REST storm, a stalled private connection and a skipped book sequence at once. `clear()`
removes every rule.
"""

from __future__ import annotations

import asyncio
import enum
import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from ingest.okx import codes
from ingest.okx.channels import Endpoint

if TYPE_CHECKING:
    from ingest.sim.hub import Hub
    from ingest.sim.session import Conn


class DropKind(enum.StrEnum):
    """How a connection is dropped: a clean close (1000), an abort with no close frame (the client sees 1006),
    or OKX's idle close (4004 "No data received in 30s.")."""

    CLEAN = "clean"
    ABORT = "abort"
    IDLE = "idle"


class Corruption(enum.StrEnum):
    """What a corrupted push looks like: invalid JSON, a truncated text, or a number where OKX sends a string."""

    MALFORMED = "malformed"
    TRUNCATED = "truncated"
    WRONG_TYPE = "wrong_type"


class FrameKind(enum.StrEnum):
    """The kind of a push, as frame rules see it."""

    UPDATE = "update"  # an incremental book update
    SNAPSHOT = "snapshot"
    PUSH = "push"  # anything else


def parse_endpoint(value: Endpoint | str | None) -> Endpoint | None:
    """An endpoint from an `Endpoint`, its path ("/ws/v5/public") or its name ("public")."""
    if value is None or isinstance(value, Endpoint):
        return value
    text = value if value.startswith("/") else f"/ws/v5/{value}"
    return Endpoint(text)


@dataclass(slots=True)
class FrameRule:
    """Skip or corrupt the next pushes matching channel/instId, `left[conn_id]` of them per connection (the
    connections that matched when the rule was made)."""

    action: str  # "skip" or a Corruption value
    channel: str | None
    inst_id: str | None
    left: dict[str, int]
    field: str | None = None
    kinds: frozenset[FrameKind] = frozenset(FrameKind)

    def matches(self, conn: Conn, channel: str, inst_id: str, kind: FrameKind) -> bool:
        return (self.left.get(conn.conn_id, 0) > 0 and kind in self.kinds
                and (self.channel is None or self.channel == channel)
                and (self.inst_id is None or self.inst_id == inst_id))

    @property
    def done(self) -> bool:
        return not any(self.left.values())


@dataclass(slots=True)
class RestRule:
    """Answer the next `remaining` requests to `path` (None: any path) with an error, a 50011, slowly, or only
    once the test releases them."""

    action: str  # "error" | "rate_limit" | "slow" | "hold"
    path: str | None
    remaining: int
    status: int = 503
    code: str = codes.SERVICE_UNAVAILABLE
    msg: str = "Service temporarily unavailable. Please try again later."
    body: str | None = None
    delay_s: float = 0.0


@dataclass(slots=True)
class LoginRule:
    code: str
    remaining: int | None
    until: float | None  # on the simulator's timer


@dataclass(slots=True)
class ConnectRule:
    remaining: int
    status: int


_WRONG_TYPE_FIELDS = ("px", "last", "markPx", "idxPx", "fundingRate", "oi", "buyLmt", "fillPx", "cashBal", "ts")


def _to_number(value: object) -> object:
    if not isinstance(value, str):
        return value
    try:
        as_float = float(value)
    except ValueError:
        return value
    return int(value) if value.lstrip("-").isdigit() else as_float


def corrupt(frame: str, how: Corruption, field: str | None = None) -> str:
    """`frame` made invalid in the requested way (pure, so tests can predict the exact text)."""
    if how is Corruption.TRUNCATED:
        return frame[: max(1, len(frame) // 2)]
    if how is Corruption.MALFORMED:
        return frame.replace('"', "'", 2)
    msg = orjson.loads(frame)
    data = msg.get("data") if isinstance(msg, dict) else None
    if not isinstance(data, list) or not data:
        return frame
    row = data[0]
    if isinstance(row, list):  # candles: [ts, o, h, l, c, ...]
        row[1] = _to_number(row[1])
    elif isinstance(row, dict):
        if field is not None and field in row:
            row[field] = _to_number(row[field])
        elif row.get("asks"):
            row["asks"][0][0] = _to_number(row["asks"][0][0])
        elif row.get("bids"):
            row["bids"][0][0] = _to_number(row["bids"][0][0])
        else:
            for name in _WRONG_TYPE_FIELDS:
                if name in row:
                    row[name] = _to_number(row[name])
                    break
    return orjson.dumps(msg).decode()


class Faults:
    """The fault-injection API (`sim.faults`). Immediate actions return the connection ids they hit."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self.frame_rules: list[FrameRule] = []
        self.rest_rules: list[RestRule] = []
        self.login_rules: list[LoginRule] = []
        self.connect_rules: list[ConnectRule] = []
        self._held: deque[tuple[str, asyncio.Future[None]]] = deque()

    # --- connections ------------------------------------------------------------------------------------
    def drop(self, kind: DropKind | str = DropKind.CLEAN, endpoint: Endpoint | str | None = None,
             conn_id: str | None = None) -> list[str]:
        """Drop matching connections now: clean close 1000, abort (no close frame: 1006), or idle close 4004."""
        how = DropKind(kind)
        hit = self._hub.select(parse_endpoint(endpoint), conn_id)
        for conn in hit:
            if how is DropKind.ABORT:
                conn.abort()
            elif how is DropKind.IDLE:
                conn.close(codes.CLOSE_IDLE, "No data received in 30s.")
            else:
                conn.close(1000, "")
        return [c.conn_id for c in hit]

    def stall(self, endpoint: Endpoint | str | None = None, conn_id: str | None = None,
              seconds: float | None = None) -> list[str]:
        """Stop sending anything (pushes, acks, pongs) on matching connections, without closing them, for
        `seconds` or until `unstall`. What would have been sent meanwhile is lost, and OKX's idle close is
        suspended, so only the client's own liveness check can notice."""
        until = math.inf if seconds is None else self._hub.timer.now() + seconds
        hit = self._hub.select(parse_endpoint(endpoint), conn_id)
        for conn in hit:
            conn.stalled_until = until
        return [c.conn_id for c in hit]

    def unstall(self, endpoint: Endpoint | str | None = None, conn_id: str | None = None) -> list[str]:
        hit = [c for c in self._hub.select(parse_endpoint(endpoint), conn_id) if c.stalled_until]
        now = self._hub.timer.now()
        for conn in hit:
            conn.stalled_until = 0.0
            conn.last_sent = now
        return [c.conn_id for c in hit]

    def notice(self, endpoint: Endpoint | str | None = None, conn_id: str | None = None,
               close_after_s: float | None = None, close_code: int | None = None) -> list[str]:
        """Send OKX's 64008 service-upgrade notice, then close each matching connection `close_after_s` later
        (default `SimConfig.notice_close_after_s`, OKX: about 60 s)."""
        cfg = self._hub.config
        delay = cfg.notice_close_after_s if close_after_s is None else close_after_s
        hit = self._hub.select(parse_endpoint(endpoint), conn_id)
        for conn in hit:
            conn.send_event({"event": "notice", "code": codes.SERVICE_UPGRADE_NOTICE,
                             "msg": "The connection will soon be closed for a service upgrade. Please reconnect."})
            conn.schedule_close(delay, cfg.notice_close_code if close_code is None else close_code,
                                "service upgrade")
        return [c.conn_id for c in hit]

    def revoke_login(self, endpoint: Endpoint | str | None = None, conn_id: str | None = None,
                     close_code: int = codes.CLOSE_KEY_UPDATED) -> list[str]:
        """Close logged-in connections as OKX does when the key is updated or deleted (4007)."""
        hit = [c for c in self._hub.select(parse_endpoint(endpoint), conn_id) if c.logged_in]
        for conn in hit:
            conn.close(close_code, "API key has been updated or deleted. Please reconnect.")
        return [c.conn_id for c in hit]

    def send_raw(self, text: str, endpoint: Endpoint | str | None = None, conn_id: str | None = None) -> list[str]:
        """Send an arbitrary text frame (malformed JSON, an unknown event, a stray `pong`...)."""
        hit = self._hub.select(parse_endpoint(endpoint), conn_id)
        for conn in hit:
            conn.send(text)
        return [c.conn_id for c in hit]

    def push_unknown_channel(self, endpoint: Endpoint | str | None = None, conn_id: str | None = None,
                             channel: str = "sim-unknown-channel", inst_id: str = "BTC-USDT") -> list[str]:
        """A well-formed push for a channel nobody subscribed to (and that OKX does not have)."""
        frame = orjson.dumps({"arg": {"channel": channel, "instId": inst_id},
                              "data": [{"instId": inst_id, "ts": str(self._hub.clock.now_ms())}]}).decode()
        return self.send_raw(frame, endpoint, conn_id)

    def reject_connects(self, count: int = 1, status: int = 503) -> None:
        """Refuse the next `count` WebSocket upgrades with HTTP `status`."""
        self.connect_rules.append(ConnectRule(count, status))

    # --- pushes -----------------------------------------------------------------------------------------
    def skip_sequence(self, inst_id: str | None = None, channel: str | None = None,
                      endpoint: Endpoint | str | None = None, conn_id: str | None = None, count: int = 1) -> None:
        """Silently drop the next `count` incremental book updates per matching (connection, channel), so the
        following update's prevSeqId does not match the last seqId the client saw. Applies to the connections
        open now."""
        self.frame_rules.append(FrameRule("skip", channel, inst_id, self._per_conn(endpoint, conn_id, count),
                                          kinds=frozenset({FrameKind.UPDATE})))

    def corrupt(self, how: Corruption | str = Corruption.MALFORMED, channel: str | None = None,
                inst_id: str | None = None, endpoint: Endpoint | str | None = None, conn_id: str | None = None,
                count: int = 1, field: str | None = None) -> None:
        """Corrupt the next `count` matching pushes: malformed JSON, truncated text, or a wrong JSON type
        (`field`, default px/last/markPx/... or the first book price, becomes a number). Applies per connection
        open now."""
        self.frame_rules.append(FrameRule(Corruption(how).value, channel, inst_id,
                                          self._per_conn(endpoint, conn_id, count), field))

    def _per_conn(self, endpoint: Endpoint | str | None, conn_id: str | None, count: int) -> dict[str, int]:
        return {c.conn_id: count for c in self._hub.select(parse_endpoint(endpoint), conn_id)}

    def reset_sequence(self, inst_id: str, to: int | None = None) -> None:
        """The next book update of `inst_id` restarts the sequence below its prevSeqId (every connection)."""
        self._hub.market.reset_sequence(inst_id, to)

    # --- auth and clock -------------------------------------------------------------------------------------
    def reject_logins(self, code: str = codes.TIMESTAMP_EXPIRED, count: int | None = 1,
                      seconds: float | None = None) -> None:
        """Answer the next `count` logins (None: all) or all logins for `seconds` with error `code`."""
        until = None if seconds is None else self._hub.timer.now() + seconds
        self.login_rules.append(LoginRule(code, count if seconds is None else None, until))

    def clock_offset(self, ms: int) -> None:
        """Skew the simulator clock by `ms` (absolute, not cumulative): pushes, /public/time and signature
        windows all move, so a client that does not correct from /public/time falls outside 30 s."""
        self._hub.clock.offset_ms = ms

    # --- REST ----------------------------------------------------------------------------------------------
    def rest_rate_limit(self, count: int, path: str | None = None, status: int | None = None) -> None:
        """A rate-limit storm: the next `count` requests (to `path`) get 50011, as HTTP `status` (429 or 200;
        default: the configured mode)."""
        self.rest_rules.append(RestRule("rate_limit", path, count, status or 0))

    def rest_error(self, count: int = 1, path: str | None = None, status: int = 503,
                   code: str = codes.SERVICE_UNAVAILABLE,
                   msg: str = "Service temporarily unavailable. Please try again later.",
                   body: str | None = None) -> None:
        """Answer the next `count` requests with HTTP `status` and `{"msg","code"}` (or the raw `body`)."""
        self.rest_rules.append(RestRule("error", path, count, status, code, msg, body))

    def rest_slow(self, delay_s: float, count: int = 1, path: str | None = None) -> None:
        """Delay the next `count` answers by `delay_s` seconds (then answer normally)."""
        self.rest_rules.append(RestRule("slow", path, count, delay_s=delay_s))

    def rest_hold(self, count: int = 1_000_000, path: str | None = None) -> None:
        """Hold the answers to the next `count` requests (to `path`) until `rest_release`: each request is
        counted on arrival (`sim.wait_rest` wakes then) and answered normally once released. Unlike
        `rest_slow`, the test, not the clock, decides when a client gets its answer."""
        self.rest_rules.append(RestRule("hold", path, count))

    def rest_held(self, path: str | None = None) -> int:
        """How many requests (to `path`) are being held now."""
        return sum(1 for p, fut in self._held if not fut.done() and (path is None or p == path))

    def rest_release(self, count: int | None = None, path: str | None = None) -> int:
        """Let the `count` oldest held requests (to `path`; None: all of them) be answered; returns how many."""
        released = 0
        for p, fut in self._held:
            if count is not None and released >= count:
                break
            if not fut.done() and (path is None or p == path):
                fut.set_result(None)
                released += 1
        self._held = deque(item for item in self._held if not item[1].done())
        return released

    async def hold_rest(self, path: str) -> None:
        """Wait until this request is released (used by the simulator for a "hold" rule)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        item = (path, fut)
        self._held.append(item)
        self._hub.watch.notify()
        try:
            await fut
        finally:
            if item in self._held:
                self._held.remove(item)

    def clear(self) -> None:
        """Remove every pending rule (immediate faults already done stay done, and requests already held stay
        held until `rest_release`, so a test can change the rules for newcomers without answering them)."""
        self.frame_rules.clear()
        self.rest_rules.clear()
        self.login_rules.clear()
        self.connect_rules.clear()

    # --- consumption (used by the simulator) --------------------------------------------------------------
    def apply_frame(self, conn: Conn, channel: str, inst_id: str, kind: FrameKind, frame: str) -> str | None:
        """The frame to send after the frame rules (None: skip it)."""
        for rule in self.frame_rules:
            if rule.matches(conn, channel, inst_id, kind):
                rule.left[conn.conn_id] -= 1
                if rule.action == "skip":
                    frame_out: str | None = None
                else:
                    frame_out = corrupt(frame, Corruption(rule.action), rule.field)
                self.frame_rules = [r for r in self.frame_rules if not r.done]
                return frame_out
        return frame

    def take_login(self, now: float) -> str | None:
        """The error code the next login gets from a rule, if any (consuming one use)."""
        self.login_rules = [r for r in self.login_rules
                            if (r.until is not None and now < r.until)
                            or (r.until is None and (r.remaining is None or r.remaining > 0))]
        for rule in self.login_rules:
            if rule.until is None and rule.remaining is not None:
                rule.remaining -= 1
            return rule.code
        return None

    def take_connect(self) -> int | None:
        for rule in self.connect_rules:
            if rule.remaining > 0:
                rule.remaining -= 1
                return rule.status
        return None

    def take_rest(self, path: str) -> list[RestRule]:
        """Rules that apply to this request (each consumed once)."""
        hit = []
        for rule in self.rest_rules:
            if rule.remaining > 0 and (rule.path is None or rule.path == path):
                rule.remaining -= 1
                hit.append(rule)
        self.rest_rules = [r for r in self.rest_rules if r.remaining > 0]
        return hit
