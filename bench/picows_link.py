"""Bench-only: the recorder's frames read by picows instead of websockets (issue 16's "would a compiled frame
reader change the picture?"). The product stays on websockets; nothing under `ingest/` imports this.

`PicowsConnections` stands in for `ConnectionManager` in front of the same inbox: the same plan
(`core.plan`), the same sans-I/O subscribe conversation (`core.wsproto.LinkProtocol`), and the same events
in the same order as the recorder's links (`core.events`): every text frame but `pong` as an `InboundFrame`
(`recv_seq` from 1), `SUBSCRIBED` right after its ack, `DISCONNECTED` for what a link held when it ends, and a
full inbox pauses the socket, as the fast lane does. What it leaves out, because a bench run never needs it:
login, keepalive pings, reconnects, the request budget and 64008 hand-overs.

picows has no permessage-deflate of its own: `open_reader` offers it in the handshake as websockets does
(`DEFLATE_OFFER`) and `Inflater` inflates with zlib, so both transports read the same compressed bytes.
picows is not a dependency of the project: `bench.picows_bench` imports this module only when picows is
installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson
import picows

from ingest.config import OkxSettings, WsSettings
from ingest.core.events import InboundFrame, LinkEvent, LinkEventKind
from ingest.core.plan import PlanLimits, PlannedConnection, plan_connections
from ingest.core.wsproto import PONG, LinkProtocol, Subscribed, Unsubscribed, classify, is_push
from ingest.io.inbox import Inbox
from ingest.io.ws_link import connection_token
from ingest.okx.channels import SubArg
from ingest.services.connections import endpoint_url, subscription_arg

if TYPE_CHECKING:
    from picows import WSFrame, WSTransport

#: What websockets' client offers by default (`compression="deflate"`).
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"
_TAIL = b"\x00\x00\xff\xff"


class Inflater:
    """permessage-deflate (RFC 7692) for the messages a server sends, from its handshake answer."""

    def __init__(self, extensions: str) -> None:
        params = {p.strip().split("=")[0] for p in extensions.split(";")}
        self.enabled = "permessage-deflate" in params
        #: The server resets its window after every message: so must we.
        self._reset = "server_no_context_takeover" in params
        self._z = zlib.decompressobj(wbits=-15)

    def inflate(self, payload: bytes) -> bytes:
        z = self._z
        if self._reset:
            z = self._z = zlib.decompressobj(wbits=-15)
        return z.decompress(payload + _TAIL)


class _Reader(picows.WSListener):
    """picows' listener: reassembles messages (fragments, deflate) and hands each to `on_message`
    from inside the socket's data_received, like the recorder's fast lane."""

    def __init__(self, on_message: Callable[[bytes], None], extensions: str) -> None:
        self.on_message = on_message
        self.inflater = Inflater(extensions)
        self.transport: WSTransport | None = None
        self.closed = asyncio.Event()
        self._parts: list[bytes] = []
        self._compressed = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is picows.WSMsgType.TEXT or kind is picows.WSMsgType.BINARY:
            if frame.fin and not self._parts:
                payload = frame.get_payload_as_bytes()
                self.on_message(self.inflater.inflate(payload) if frame.rsv1 and self.inflater.enabled else payload)
                return
            self._parts = [frame.get_payload_as_bytes()]
            self._compressed = frame.rsv1
        elif kind is picows.WSMsgType.CONTINUATION:
            self._parts.append(frame.get_payload_as_bytes())
        elif kind is picows.WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
            return
        else:
            return  # pings are answered by picows itself (enable_auto_pong)
        if frame.fin:
            payload = b"".join(self._parts)
            self._parts = []
            self.on_message(self.inflater.inflate(payload) if self._compressed and self.inflater.enabled else payload)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed.set()


async def open_reader(url: str, compression: bool, on_message: Callable[[bytes], None]) -> _Reader:
    """A picows client connection to `url` whose every message goes to `on_message` (deflate offered when
    `compression`, as the recorder's `ws.compression` does)."""
    def factory(request: Any, response: Any) -> _Reader:
        return _Reader(on_message, response.headers.get("Sec-WebSocket-Extensions", ""))

    headers = {"Sec-WebSocket-Extensions": DEFLATE_OFFER} if compression else None
    _, reader = await picows.ws_connect(factory, url, extra_headers=headers, max_frame_size=1 << 30)
    assert isinstance(reader, _Reader)
    return reader


def send_text(reader: _Reader, payload: bytes) -> None:
    assert reader.transport is not None
    reader.transport.send(picows.WSMsgType.TEXT, payload)


async def close_reader(reader: _Reader) -> None:
    """Close the handshake way and wait (briefly) until the socket is gone."""
    transport = reader.transport
    if transport is None or transport.is_disconnected:
        return
    transport.send_close(picows.WSCloseCode.OK)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2):  # the simulator answers a close at once
            await transport.wait_disconnected()
    transport.disconnect(graceful=False)


class PicowsLink:
    """One planned connection over picows, putting the recorder's events into the inbox (module docstring)."""

    def __init__(self, spec: PlannedConnection, url: str, inbox: Inbox, compression: bool, max_request_bytes: int,
                 ) -> None:
        self.spec = spec
        self.url = url
        self.inbox = inbox
        self.compression = compression
        self.conn = f"{spec.name}#1-{connection_token()}"
        self.proto = LinkProtocol(max_request_bytes)
        self.recv_seq = 0
        #: The bookkeeping the recorder's fast lane does per frame (counters, keepalive stamp), so both
        #: transports pay for it.
        self.frames = 0
        self.bytes = 0
        self.last_rx = 0.0
        self.owned: set[SubArg] = set()
        self.resubscribing: set[SubArg] = set()
        self.reader: _Reader | None = None

    async def run(self) -> None:
        """Connect, subscribe every arg, read until cancelled or closed; then balance the SUBSCRIBEDs."""
        self.reader = reader = await open_reader(self.url, self.compression, self.on_message)
        try:
            for req in self.proto.subscribe(self.spec.args):
                send_text(reader, req.payload)
            await reader.closed.wait()
        finally:
            await close_reader(reader)
            if self.owned:
                self._event(LinkEventKind.DISCONNECTED, tuple(sorted(self.owned)), reason="closed")
                self.owned.clear()

    def resubscribe(self, arg: SubArg) -> bool:
        """Unsubscribe `arg`, and subscribe it again once OKX acknowledged that (a fresh book snapshot)."""
        if self.reader is None or arg not in self.owned or arg in self.resubscribing:
            return False
        self.resubscribing.add(arg)
        for req in self.proto.unsubscribe([arg]):
            send_text(self.reader, req.payload)
        return True

    def on_message(self, data: bytes) -> None:
        """One message, from the socket's data_received: what `Connection._on_frame` and the fast lane do."""
        recv_ts_ns = time.time_ns()
        self.last_rx = time.monotonic()
        self.frames += 1
        self.bytes += len(data)
        if data == PONG:
            return
        self.recv_seq += 1
        inbox = self.inbox
        if is_push(data):
            inbox.put_nowait(InboundFrame(conn=self.conn, name=self.spec.name, endpoint=self.spec.endpoint,
                                          recv_seq=self.recv_seq, recv_ts_ns=recv_ts_ns, data=data,
                                          okx_conn_id=self.proto.conn_id))
        else:
            ev = classify(data).event
            inbox.put_nowait(InboundFrame(conn=self.conn, name=self.spec.name, endpoint=self.spec.endpoint,
                                          recv_seq=self.recv_seq, recv_ts_ns=recv_ts_ns, data=data,
                                          okx_conn_id=(ev.conn_id if ev is not None and ev.conn_id else None)
                                          or self.proto.conn_id))
            if ev is not None:
                for out in self.proto.receive(ev):
                    self._outcome(out)
        if inbox.over() and self.reader is not None and self.reader.transport is not None:
            # Back-pressure without waiting, as the fast lane does: stop reading until the pipeline caught up.
            socket = self.reader.transport.underlying_transport
            socket.pause_reading()
            inbox.pause_until_room(self, socket.resume_reading)

    def _outcome(self, out: object) -> None:
        if isinstance(out, Subscribed) and out.arg in self.spec.args and out.arg not in self.owned:
            self.owned.add(out.arg)
            self._event(LinkEventKind.SUBSCRIBED, (out.arg,))
        elif isinstance(out, Unsubscribed) and out.arg in self.owned:
            self.owned.discard(out.arg)
            self._event(LinkEventKind.DISCONNECTED, (out.arg,), reason="resubscribe")
            if out.arg in self.resubscribing and self.reader is not None:
                self.resubscribing.discard(out.arg)
                for req in self.proto.subscribe([out.arg]):
                    send_text(self.reader, req.payload)

    def _event(self, kind: LinkEventKind, args: tuple[SubArg, ...], reason: str = "") -> None:
        self.inbox.put_nowait(LinkEvent(kind=kind, conn=self.conn, name=self.spec.name, ts_ns=time.time_ns(),
                                        args=args, reason=reason))


class PicowsConnections:
    """Every planned connection over picows; the bench's `ConnectionManager` (a `core.events.Resubscriber`)."""

    def __init__(self, okx: OkxSettings, ws: WsSettings, inbox: Inbox) -> None:
        wanted = [subscription_arg(s) for s in okx.all_subscriptions()]
        plan = plan_connections(wanted, PlanLimits(ws.args_per_connection, ws.depth_channels_per_connection,
                                                   ws.subscribe_max_bytes))
        self.links = tuple(PicowsLink(spec, endpoint_url(okx, ws, spec.endpoint), inbox, ws.compression,
                                      ws.subscribe_max_bytes) for spec in plan)
        self._by_arg = {arg: link for link in self.links for arg in link.spec.args}
        self.resubscribes = 0

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for link in self.links:
                tg.create_task(link.run(), name=f"picows-{link.spec.name}")

    def request_resubscribe(self, arg: SubArg, reason: str) -> None:
        link = self._by_arg.get(arg)
        if link is not None and link.resubscribe(arg):
            self.resubscribes += 1


# ---------------------------------------------------------------------------------------------- the floor


class Counter:
    """The bare client's work per message: `orjson.loads`, counted; `reached` once `target` messages came."""

    def __init__(self) -> None:
        self.got = 0
        self.target = float("inf")
        self.reached = asyncio.Event()

    def __call__(self, data: bytes) -> None:
        orjson.loads(data)
        self.got += 1
        if self.got >= self.target:
            self.reached.set()

    async def wait_for(self, target: float, timeout: float) -> None:  # noqa: ASYNC109
        self.target = target
        self.reached.clear()
        if self.got < target:
            async with asyncio.timeout(timeout):
                await self.reached.wait()


async def subscribed_floor(url: str, args: Sequence[dict[str, str]], compression: bool, counter: Counter,
                           ) -> _Reader:
    """A bare picows client subscribed to `args`, every message (the acks too) counted by `counter`."""
    reader = await open_reader(url, compression, counter)
    send_text(reader, orjson.dumps({"op": "subscribe", "args": list(args)}))
    return reader
