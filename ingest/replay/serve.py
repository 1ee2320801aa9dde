"""`okx-ingest replay serve`: OKX's WebSocket protocol served back from a recording.

A trading bot's or the recorder's own code connects to `/ws/v5/public` and `/ws/v5/business` as to OKX,
subscribes, answers pings, and receives the recorded pushes of its args in recorded order (the `recorded`
view: what OKX sent, not what a backfill added later). Where the recording has the frame itself (okx.raw: every
inbound frame verbatim, matched to its records by connection and receive sequence), that frame is sent byte for
byte, once, at its first record; otherwise the frame is re-rendered from the records in OKX's push shape
(`{"arg": ..., "data": [...]}`, books with `action`), with OKX's exact strings when the source is Kafka.
The recorded frames are read as the timeline plays too (`RawWindow`): those received within a margin of the
played exchange ts are held, so neither records nor frames grow with the window.

One timeline per server: a player walks the replay's items once, as they are read (`READ_AHEAD` items at a
time, on a thread, the next chunk read while the current one plays: memory stays bounded whatever the window).
It starts when the client's subscriptions have settled (every arg of the first chunk subscribed, or no new
subscription for `settle_s`), then sends each
record to the connections subscribed to its arg, either `speed` times real time (exchange time) or, with
speed 0, as fast as the client reads (each send waits for the socket to drain). At a recorded disconnect (a
`disconnect` gap of a subscribed arg) it drops that connection without a close frame, as a network loss
looks, and waits (up to `resubscribe_timeout_s`) for the arg to be subscribed again before going on: the
client's reconnect logic runs against history and nothing after the disconnect is lost.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import logging
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import orjson
from aiohttp import WSMsgType, web

from ingest.config import Settings
from ingest.core.records import BookUpdate, Candle, GapEvent, GapKind, OkxRecord, Source
from ingest.core.replay import CHECKPOINT, Item
from ingest.okx import codes
from ingest.okx.channels import Endpoint, SubArg, endpoint_for
from ingest.replay._kafka import REORDER_MARGIN_MS
from ingest.runtime import CANCEL_GRACE_S, Ended, Runtime, bounded

if TYPE_CHECKING:
    from ingest.replay import ReplayStats

log = logging.getLogger(__name__)

#: Fields the recorder adds (receive side, its event key): never part of what OKX pushed.
_RECEIVE_KEYS = ("exchange", "channel", "recvTsNs", "source", "connId", "recvSeq", "recordId", "extra", "action",
                 "eventKey")
_SERVED = (Endpoint.PUBLIC, Endpoint.BUSINESS)


def _arg(record: OkxRecord) -> SubArg:
    return SubArg(record.channel, record.inst_id) if record.inst_id else SubArg(record.channel,
                                                                                inst_type=record.inst_type)


def _served(item: Item) -> bool:
    """Gaps (for their disconnects) and what OKX itself pushed: ws records of public/business channels, without
    the recorder's own book checkpoints (OKX never sends `action: checkpoint`)."""
    if isinstance(item, GapEvent):
        return True
    if not isinstance(item, OkxRecord) or item.source is not Source.WS or endpoint_for(item.channel) not in _SERVED:
        return False
    return not (isinstance(item, BookUpdate) and str(item.action) == CHECKPOINT)


def render(record: OkxRecord) -> str:
    """The OKX push frame that carried `record` (one data row), in the shape the normalizer reads."""
    arg = _arg(record).to_okx()
    if isinstance(record, Candle):
        row: Any = [str(record.ts), record.o, record.h, record.l, record.c, record.vol, record.vol_ccy,
                    record.vol_ccy_quote, "1" if record.confirm else "0"]
        return orjson.dumps({"arg": arg, "data": [[v for v in row if v is not None]]}).decode()
    body: dict[str, Any] = msgspec.to_builtins(record)
    for key in _RECEIVE_KEYS:
        body.pop(key, None)
    if "okxSource" in body:
        body["source"] = body.pop("okxSource")
    body = {k: v for k, v in body.items() if v is not None}
    body.update(record.extra)
    body["ts"] = str(record.ts)
    if isinstance(record, BookUpdate):
        body.pop("instId", None)
        body.pop("instType", None)
        return orjson.dumps({"arg": arg, "action": str(record.action), "data": [body]}).decode()
    return orjson.dumps({"arg": arg, "data": [body]}).decode()


#: One recorded frame: the Kafka ts (ms) of the okx.raw record that carried it, its (connId, recvSeq), its bytes.
RawEntry = tuple[int, tuple[str, int], bytes]


class RawWindow:
    """The recorded frames the player may need next, read as it plays (`Replay.raw_stream`).

    A record's frame was received around its exchange ts, so the frames held are those whose raw record reached
    Kafka within `margin_ms` of the played position (the rule that bounds the window's own read at its edges):
    read ahead `chunk` frames at a time on a thread up to the position + margin, the next chunk read while these
    are used, and dropped once the position is `margin_ms` past them. Memory: two margins of frames and two
    chunks, whatever the window. A record whose frame is not held (received over a margin from its exchange ts,
    as a long candle's updates are) is re-rendered. A Mapping (`held`) is held whole, as given.
    """

    def __init__(self, frames: Iterable[RawEntry] = (), *, chunk: int, margin_ms: int,
                 held: Mapping[tuple[str, int], bytes] | None = None) -> None:
        self._source = iter(frames)
        self._chunk, self._margin = chunk, margin_ms
        self._held: dict[tuple[str, int], bytes] = dict(held or {})
        self._sent: set[tuple[str, int]] = set()
        self._order: collections.deque[tuple[int, tuple[str, int]]] = collections.deque()
        self._next: asyncio.Future[list[RawEntry]] | None = None
        self._done = held is not None
        self._read_to = -(1 << 62)  # the highest Kafka ts read so far
        #: Frames read from the source so far.
        self.read = 0

    def __len__(self) -> int:
        """Frames held (read and not yet sent or dropped), and the keys of the sent ones still in the margin."""
        return len(self._held) + len(self._sent)

    @property
    def done(self) -> bool:
        """Whether every frame of the source was read."""
        return self._done

    def take(self, key: tuple[str, int]) -> bytes | None:
        """The frame, if held and not sent yet; from then on `was_sent` (its bytes are let go)."""
        payload = self._held.pop(key, None)
        if payload is not None:
            self._sent.add(key)
        return payload

    def was_sent(self, key: tuple[str, int]) -> bool:
        """Whether `take` gave the frame (a later row of it rides along), as long as it would still be held."""
        return key in self._sent

    def _read_chunk(self) -> list[RawEntry]:
        return list(itertools.islice(self._source, self._chunk))

    async def first(self) -> None:
        """Read the first chunk (before the server listens: a source error surfaces there)."""
        if not self._done:
            self._add(await asyncio.to_thread(self._read_chunk))

    def _add(self, chunk: list[RawEntry]) -> None:
        self.read += len(chunk)
        self._done = len(chunk) < self._chunk
        for ts, key, payload in chunk:
            self._held[key] = payload
            self._order.append((ts, key))
            self._read_to = max(self._read_to, ts)

    async def advance(self, ts: int) -> None:
        """Hold every frame up to `ts` + margin (reading on), drop those before `ts` - margin."""
        while not self._done and self._read_to < ts + self._margin:
            if self._next is None:
                self._next = asyncio.ensure_future(asyncio.to_thread(self._read_chunk))
            chunk = await self._next
            self._next = None
            self._add(chunk)
            if not self._done:  # the next chunk is read while these are used
                self._next = asyncio.ensure_future(asyncio.to_thread(self._read_chunk))
        order, held, sent, oldest = self._order, self._held, self._sent, ts - self._margin
        while order and order[0][0] < oldest:
            key = order.popleft()[1]
            held.pop(key, None)
            sent.discard(key)

    def close(self) -> None:
        """Let the source go: its reader (Kafka consumers) closes now, or with its thread's chunk if one is read."""
        if self._next is not None and not self._next.done():
            self._next.cancel()  # the thread ends with its chunk; nobody reads it
            return
        close = getattr(self._source, "close", None)
        if callable(close):
            close()


@dataclass(eq=False)
class _Client:
    ws: web.WebSocketResponse
    endpoint: Endpoint
    subs: set[SubArg] = field(default_factory=set)


class ReplayServer:
    """The server (module docstring); `async with` it, then connect to `url(endpoint)`."""

    def __init__(self, items: Iterable[Item], *, host: str = "127.0.0.1", port: int = 0, speed: float = 0.0,
                 settle_s: float = 1.0, resubscribe_timeout_s: float = 30.0,
                 frames: Mapping[tuple[str, int], bytes] | Iterable[RawEntry] | None = None,
                 on_finished: Callable[[ReplayServer], None] | None = None) -> None:
        self._items = items
        #: Told when the timeline is played through (serve's end-of-session summary).
        self._on_finished = on_finished
        #: Recorded frames, sent verbatim instead of re-rendered: a stream in Kafka order (`Replay.raw_stream`),
        #: read as the timeline plays, or a Mapping by (connId, recvSeq) (`Replay.raw_frames`), held whole.
        self.frames = RawWindow(chunk=self.READ_AHEAD, margin_ms=self.RAW_MARGIN_MS, held=frames) \
            if isinstance(frames, Mapping) or frames is None else \
            RawWindow(frames, chunk=self.READ_AHEAD, margin_ms=self.RAW_MARGIN_MS)
        #: Frames of the timeline sent as recorded, and re-rendered from their records (no recorded frame).
        self.verbatim = 0
        self.rendered = 0
        self.host, self._port, self.speed = host, port, speed
        self.settle_s, self.resubscribe_timeout_s = settle_s, resubscribe_timeout_s
        self._clients: set[_Client] = set()
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        #: Owns the player task: its stop is bounded and its failure surfaced (`wait`).
        self._runtime = Runtime("replay-serve")
        self.finished = asyncio.Event()
        self.sent = 0
        self.disconnects = 0
        self._args: set[SubArg] = set()
        self._source: Iterator[Item] = iter(())
        self._ahead: list[Item] = []
        #: Items of the first chunk (read before the first client), and whether it held the whole window.
        self.first_items = 0
        self.whole_window_read = False

    #: Items (and recorded frames) read (and held) at a time.
    READ_AHEAD = 10_000
    #: Recorded frames are held from this long before the played exchange ts to this long after it.
    RAW_MARGIN_MS = REORDER_MARGIN_MS

    def _read_chunk(self) -> list[Item]:
        out: list[Item] = []
        for item in self._source:
            if _served(item):
                out.append(item)
                if len(out) >= self.READ_AHEAD:
                    break
        return out

    async def _timeline(self) -> AsyncIterator[Item]:
        """The served items in order; the next chunk is read on a thread while the current one plays."""
        chunk, self._ahead = self._ahead, []
        while chunk:
            following = asyncio.ensure_future(asyncio.to_thread(self._read_chunk))
            try:
                for item in chunk:
                    yield item
                chunk = await following
            finally:
                if not following.done():
                    following.cancel()  # the thread ends with its chunk; nobody reads it

    @property
    def port(self) -> int:
        return self._port

    def url(self, endpoint: Endpoint = Endpoint.PUBLIC) -> str:
        return f"ws://{self.host}:{self._port}{endpoint.value}"

    @property
    def ws_base(self) -> str:
        return f"ws://{self.host}:{self._port}"

    async def __aenter__(self) -> ReplayServer:
        # The window's first chunk is read before the first client: a source error surfaces here, not
        # mid-session (a corrupt file further on ends the player, which `wait` reports).
        self._source = iter(self._items)
        self._ahead = await asyncio.to_thread(self._read_chunk)
        self.first_items = len(self._ahead)
        self.whole_window_read = self.first_items < self.READ_AHEAD
        self._args = {_arg(i) for i in self._ahead if isinstance(i, OkxRecord)}
        await self.frames.first()
        app = web.Application()
        for endpoint in _SERVED:
            app.router.add_get(endpoint.value, self._handler(endpoint))
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._port)
        await site.start()
        self._port = int(self._runner.addresses[0][1])
        self._runtime.spawn("player", self._play())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runtime.close(CANCEL_GRACE_S)
        self.frames.close()
        for client in list(self._clients):
            await bounded(client.ws.close(), CANCEL_GRACE_S, what="replay client close")
        if self._runner is not None:
            await bounded(self._runner.cleanup(), CANCEL_GRACE_S, what="replay server cleanup")

    async def wait(self, stop: asyncio.Event) -> Ended:
        """Serve until `stop` is set or the player fails (the timeline ending is not a reason to stop)."""
        return await self._runtime.wait(stop)

    def _handler(self, endpoint: Endpoint) -> Any:
        async def handle(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse(autoping=True, compress=False)
            await ws.prepare(request)
            client = _Client(ws, endpoint)
            self._clients.add(client)
            try:
                async for msg in ws:
                    if msg.type is WSMsgType.TEXT:
                        await self._request(client, msg.data)
            finally:
                self._clients.discard(client)
                self._notify()
            return ws

        return handle

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _request(self, client: _Client, text: str) -> None:
        """OKX's answers to ping, subscribe and unsubscribe (login is refused: private streams are not served)."""
        if text == "ping":
            await client.ws.send_str("pong")
            return
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError:
            msg = None
        if not isinstance(msg, dict):
            await self._error(client, codes.INVALID_REQUEST, f"Invalid request: {text}")
            return
        op, req_id, args = msg.get("op"), msg.get("id"), msg.get("args")
        if op not in ("subscribe", "unsubscribe"):
            await self._error(client, codes.INVALID_OP, f"Invalid op: {op}", req_id)
            return
        if not isinstance(args, list) or not args or not all(isinstance(a, dict) for a in args):
            await self._error(client, codes.INVALID_REQUEST, f"Invalid request: {text}", req_id)
            return
        for arg in args:
            channel = arg.get("channel")
            home = endpoint_for(channel) if isinstance(channel, str) else None
            if home is not client.endpoint:
                await self._error(client, codes.WRONG_URL_OR_CHANNEL,
                                  f"Wrong URL or channel:{channel}, doesn't exist. Please use the correct URL, "
                                  "channel and parameters referring to API document.", req_id)
                continue
            sub = SubArg.from_okx(arg)
            if op == "subscribe":
                client.subs.add(sub)
            else:
                client.subs.discard(sub)
            echo = {k: v for k, v in arg.items() if isinstance(v, str)}
            event: dict[str, object] = {"event": op, "arg": echo}
            if req_id is not None:
                event["id"] = req_id
            await client.ws.send_str(orjson.dumps(event).decode())
        self._notify()

    async def _error(self, client: _Client, code: str, text: str, req_id: object = None) -> None:
        event: dict[str, object] = {"event": "error", "code": code, "msg": text}
        if req_id is not None:
            event["id"] = req_id
        await client.ws.send_str(orjson.dumps(event).decode())

    def _subscribed(self) -> set[SubArg]:
        return {s for c in self._clients for s in c.subs}

    async def _wait(self, predicate: Any, timeout_s: float) -> bool:
        """Wait until predicate() holds (re-checked at every subscription change), at most timeout_s."""
        try:
            async with asyncio.timeout(timeout_s):
                while not predicate():
                    await self._changed.wait()
            return True
        except TimeoutError:
            return False

    async def _settle(self) -> None:
        await self._wait(lambda: bool(self._subscribed()), 1e9)
        while not self._args <= self._subscribed():
            changed = self._changed
            try:
                async with asyncio.timeout(self.settle_s):
                    await changed.wait()
            except TimeoutError:
                return

    async def _play(self) -> None:
        await self._settle()
        loop = asyncio.get_running_loop()
        t0_wall: float | None = None
        t0_ts = 0
        frames = self.frames
        async for item in self._timeline():
            if isinstance(item, GapEvent):
                if item.kind is GapKind.DISCONNECT:
                    await self._disconnect(item)
                continue
            assert isinstance(item, OkxRecord)
            if self.speed > 0:
                if t0_wall is None:
                    t0_wall, t0_ts = loop.time(), item.ts
                delay = t0_wall + (item.ts - t0_ts) / 1000 / self.speed - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing to recorded exchange time, not synchronisation
            arg = _arg(item)
            await frames.advance(item.ts)
            raw_key = (item.conn_id, item.recv_seq) if item.conn_id is not None and item.recv_seq is not None \
                else None
            if raw_key is not None and frames.was_sent(raw_key):
                continue  # a later row of a frame already sent whole
            raw = frames.take(raw_key) if raw_key is not None else None
            if raw is not None:
                frame = raw.decode()
                self.verbatim += 1
            else:
                frame = render(item)
                self.rendered += 1
            for client in [c for c in self._clients if arg in c.subs]:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await client.ws.send_str(frame)
                    self.sent += 1
        self.finished.set()
        log.info("replay_timeline_finished", extra={"sent": self.sent, "verbatim": self.verbatim,
                                                    "rendered": self.rendered, "disconnects": self.disconnects})
        if self._on_finished is not None:
            self._on_finished(self)

    async def _disconnect(self, gap: GapEvent) -> None:
        arg = SubArg(gap.channel, gap.inst_id) if gap.inst_id else SubArg(gap.channel, inst_type=gap.inst_type)
        victims = [c for c in self._clients if arg in c.subs]
        if not victims:
            return
        self.disconnects += 1
        lost = set().union(*(c.subs for c in victims))
        for client in victims:
            self._clients.discard(client)
            transport = client.ws._req.transport if client.ws._req is not None else None
            if transport is not None:
                transport.abort()  # no close frame: what a lost connection looks like to the client
        self._notify()
        if not await self._wait(lambda: lost <= self._subscribed(), self.resubscribe_timeout_s):
            missing = sorted(map(str, lost - self._subscribed()))
            log.warning("replay_resubscribe_timeout", extra={"subscriptions": missing})


def session_summary(server: ReplayServer, stats: ReplayStats, from_kafka: bool) -> str:
    """serve's end-of-session line: what went out, and (from Kafka) what was left out for arriving too late."""
    end = "the window played through" if server.finished.is_set() else "stopped before the end of the window"
    line = (f"okx-ingest: served {server.sent} pushes ({server.verbatim} recorded frames verbatim, "
            f"{server.rendered} re-rendered), {server.disconnects} disconnects, {end}")
    if from_kafka:
        line += (f"; {stats.late} late records left out, {stats.late_raw} late raw frames left out (over "
                 f"{REORDER_MARGIN_MS // 1000} s out of order; their records re-rendered)")
    return line


def serve_main(args: argparse.Namespace, settings: Settings) -> int:
    """Run `okx-ingest replay serve` until Ctrl-C."""
    from ingest.replay import replay
    from ingest.services.process import install_signals

    rp = replay(args.source, args.start, args.end, instruments=args.inst, channels=args.channel, view="recorded",
                settings=settings, lenient=args.lenient, exact_decimals=True)

    def summary(server: ReplayServer) -> None:
        print(session_summary(server, rp.stats, rp.from_kafka), file=sys.stderr, flush=True)

    async def main() -> int:
        async with ReplayServer(iter(rp), host=args.host, port=args.port, speed=args.speed,
                                frames=rp.raw_stream(), on_finished=summary) as server:
            count = (f"{server.first_items} items" if server.whole_window_read else
                     f"more than {server.first_items:,} items (read as they are played)")
            raw = server.frames
            frames = (f"{raw.read} recorded frames verbatim" if raw.done else
                      f"more than {raw.read:,} recorded frames verbatim, read as they are played")
            print(f"okx-ingest: replaying {count} ({frames}) on {server.ws_base}/ws/v5/{{public,business}}",
                  flush=True)
            stop, reload = asyncio.Event(), asyncio.Event()
            remove_signals = install_signals(stop, reload)
            try:
                ended = await server.wait(stop)
            finally:
                remove_signals()
            if not server.finished.is_set():
                summary(server)  # stopped mid-window: what went out until then
        return ended.exit_code

    return asyncio.run(main())

