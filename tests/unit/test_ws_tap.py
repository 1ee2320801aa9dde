"""The WebSocket fast lane's connection class on its own: arrival order across lanes, who holds the socket."""

from __future__ import annotations

import asyncio
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from ingest.io.ws_tap import TapConnection, open_tapped


class FakeTransport(asyncio.Transport):
    """Just enough of a transport to see pause/resume calls."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = True
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.reading = False
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.reading = True
        self.calls.append("resume")

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: Any) -> None:
        pass


def open_connection(max_queue: int = 16) -> tuple[TapConnection, FakeTransport]:
    protocol = ClientProtocol(parse_uri("ws://okx.test/ws/v5/public"), state=State.OPEN)
    conn = TapConnection(protocol, ping_interval=None, max_queue=max_queue)
    transport = FakeTransport()
    conn.connection_made(transport)
    return conn, transport


def text(data: bytes, fin: bool = True, opcode: Opcode = Opcode.TEXT) -> Frame:
    return Frame(opcode, data, fin=fin)


def taker(into: list[bytes]) -> Any:
    """A tap that takes every frame."""
    def tap(data: bytes) -> bool:
        into.append(data)
        return True
    return tap


async def test_frames_before_the_tap_and_every_frame_behind_them_keep_arrival_order() -> None:
    conn, _ = open_connection()
    assert conn.fast_lane
    tapped: list[bytes] = []
    conn.process_event(text(b"early"))  # arrives with the handshake, before the reader set its tap
    conn.tap = taker(tapped)
    conn.process_event(text(b"push-1"))  # behind a message the reader has not handled: the usual way
    assert conn.slow_pending == 2 and tapped == []
    read = [await conn.recv(decode=False)]
    conn.message_handled()  # as the reader does after handling a message
    read.append(await conn.recv(decode=False))
    conn.message_handled()
    conn.process_event(text(b"push-2"))  # nothing pending: the fast lane
    assert read == [b"early", b"push-1"] and tapped == [b"push-2"] and conn.slow_pending == 0


async def test_fragmented_messages_take_the_usual_way_whole() -> None:
    conn, _ = open_connection()
    tapped: list[bytes] = []
    conn.tap = taker(tapped)
    conn.process_event(text(b'{"arg":', fin=False))
    conn.process_event(text(b"{}}", opcode=Opcode.CONT))
    assert tapped == [] and conn.slow_pending == 1
    assert await conn.recv(decode=False) == b'{"arg":{}}'


async def test_the_socket_reads_again_only_when_neither_the_inbox_nor_websockets_holds_it() -> None:
    conn, transport = open_connection(max_queue=2)
    conn.hold("inbox")
    for n in range(4):  # the Assembler passes its high-water mark and pauses too
        conn.process_event(text(b"event-%d" % n))
    assert conn.holds == {"inbox", "assembler"}
    for _ in range(4):  # the reader empties the Assembler: it resumes, but the inbox still holds
        await conn.recv(decode=False)
    assert conn.holds == {"inbox"} and not transport.reading
    conn.release("inbox")
    assert transport.reading and transport.calls == ["pause", "resume"]


async def test_over_a_real_socket_the_tap_takes_what_it_accepts_and_recv_reads_the_rest_in_order() -> None:
    sent = [b'{"arg":{"channel":"trades"},"data":[%d]}' % n for n in range(50)]
    sent[10] = b'{"event":"subscribe"}'  # declined by the tap below: read by recv(), ahead of what follows
    done = asyncio.Event()

    async def handler(server_ws: ServerConnection) -> None:
        for frame in sent:
            await server_ws.send(frame.decode())
        await done.wait()

    async with serve(handler, "127.0.0.1", 0, compression="deflate") as server:
        port = next(iter(server.sockets)).getsockname()[1]
        ws = await open_tapped(f"ws://127.0.0.1:{port}", open_timeout=5, close_timeout=1, max_size=2**20,
                               compression=True, ssl_context=None)
        try:
            assert ws.fast_lane
            arrived: list[bytes] = []
            taken: list[bytes] = []

            def tap(data: bytes) -> bool:
                if data.startswith(b'{"event"'):
                    return False
                arrived.append(data)
                taken.append(data)
                return True

            ws.tap = tap
            async with asyncio.timeout(10):
                while len(arrived) < len(sent):  # polling a real condition, with a deadline
                    if ws.slow_pending:  # a message waits on the usual lane: recv() returns it at once
                        arrived.append(await ws.recv(decode=False))
                        ws.message_handled()
                    else:
                        await asyncio.sleep(0.001)
        finally:
            done.set()
            await ws.close()
    assert arrived == sent  # one order across both lanes
    assert taken and sent[10] not in taken  # the fast lane carried frames, and never the one it declined
