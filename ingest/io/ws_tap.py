"""The WebSocket fast lane: the only code that relies on websockets' internals (checked on 15.0.1 to 17.x).

`open_tapped()` opens a `TapConnection`, websockets' asyncio client connection with one extra lane:
from `data_received`, each complete data frame is offered to `tap` first, synchronously; when `tap` takes
it, websockets' message queue (Assembler), `recv()` and a wake-up of the reader task per frame are
skipped, which is most of a frame's cost in this layer. Whatever `tap` declines (events, pongs, a
hand-over in progress), frames before `tap` is set and fragmented messages take the usual path, read by
`recv()`. A frame may take the fast lane only while no earlier message is on the usual one
(`slow_pending`), so frames are handed over in arrival order either way.

What it touches in websockets: `Connection.process_event` (overridden), `Connection.recv_messages` (the
Assembler: its `put`, and its `pause`/`resume` flow-control hooks, rerouted through `hold`). When the
Assembler has no such hooks (a websockets release changed it), `fast_lane` stays False and the caller
must not set `tap`: every frame then takes the usual path. `make compat` (tests/compat.sh) runs this
module's tests against the oldest and the newest websockets release the pin allows (with aiokafka's).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.frames import Frame, Opcode
from websockets.protocol import Event

#: Who may pause the socket: websockets' Assembler (its queue is full) and the pipeline's inbox.
ASSEMBLER = "assembler"
INBOX = "inbox"


class TapConnection(ClientConnection):
    """websockets' client connection with a fast lane for complete data frames (see the module doc).

    Reading is paused for two owners, websockets' Assembler and the inbox (over its limit): `holds`
    names who holds it, and the socket reads again only when neither does.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Offered every complete data frame first; returns True when it took the frame.
        self.tap: Callable[[bytes], bool] | None = None
        #: Messages given to the Assembler and not yet fully handled by the reader.
        self.slow_pending = 0
        self.holds: set[str] = set()
        #: The Assembler's flow control could be routed through `hold` (websockets 15-17 internals).
        self.fast_lane = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assembler = self.recv_messages
        if hasattr(assembler, "pause") and hasattr(assembler, "resume"):
            assembler.pause = lambda: self.hold(ASSEMBLER)
            assembler.resume = lambda: self.release(ASSEMBLER)
            self.fast_lane = True

    @property
    def backlogged(self) -> bool:
        """Frames wait on our side (socket paused, or a message not yet handed over): silence is ours."""
        return bool(self.holds) or self.slow_pending > 0

    def message_handled(self) -> None:
        """The reader finished a message it got from `recv()`: frames behind it may take the fast lane."""
        self.slow_pending -= 1

    def hold(self, owner: str) -> None:
        """Stop reading the socket on behalf of `owner`."""
        if not self.holds:
            self.transport.pause_reading()
        self.holds.add(owner)

    def release(self, owner: str) -> None:
        """`owner` no longer needs the socket paused; it reads again once nobody does."""
        if owner in self.holds:
            self.holds.discard(owner)
            if not self.holds and not self.transport.is_closing():
                self.transport.resume_reading()

    def abort(self) -> None:
        """Drop the TCP connection at once (no close handshake): the peer is gone."""
        self.transport.abort()

    def process_event(self, event: Event) -> None:
        if type(event) is Frame:
            opcode = event.opcode
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY or opcode is Opcode.CONT:
                tap = self.tap
                if (tap is not None and event.fin and opcode is not Opcode.CONT and not self.slow_pending
                        and tap(bytes(event.data))):
                    return
                if event.fin:
                    self.slow_pending += 1  # whether or not `tap` is set yet: the reader counts every message
                self.recv_messages.put(event)
                return
        super().process_event(event)


async def open_tapped(url: str, *, open_timeout: float, close_timeout: float, max_size: int, compression: bool,
                      ssl_context: ssl.SSLContext | None, proxy: str | None = None) -> TapConnection:
    """Open a `TapConnection` (OKX's keepalive is its text `ping`, so websockets' own pings are off).

    `proxy`: the HTTP(S) proxy to tunnel through, as `ingest.io.proxy` chose it; None connects directly
    (never websockets' own environment lookup).
    """
    ws = await connect(
        url,
        ping_interval=None,
        open_timeout=open_timeout,
        close_timeout=close_timeout,
        max_size=max_size,
        compression="deflate" if compression else None,
        ssl=ssl_context,
        proxy=proxy,
        create_connection=TapConnection,
    )
    assert isinstance(ws, TapConnection)
    return ws
