"""`replay serve` speaks OKX's protocol: acks, errors, pong, pushes of the subscribed args, and disconnects."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import msgspec
import orjson
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from ingest.config import load_settings
from ingest.core.archive_schema import Coordinates
from ingest.core.records import (
    BookAction,
    BookUpdate,
    GapEvent,
    GapKind,
    GapStatus,
    RawFrameEntry,
    RawFrames,
    Source,
    StreamPosition,
    TopicKind,
    Trade,
)
from ingest.core.replay import Item
from ingest.io.broker import free_port
from ingest.okx.channels import Endpoint
from ingest.replay import replay
from ingest.replay.serve import ReplayServer, _served, render
from tests.conftest import BrokerInfo
from tests.e2e.replay_support import write_archive
from tests.integration.test_backfill import publish

T0 = 1_796_000_000_000


def _trade(n: int, inst: str = "BTC-USDT") -> Trade:
    return Trade(channel="trades-all", inst_id=inst, ts=T0 + n, recv_ts_ns=(T0 + n) * 1_000_000, source=Source.WS,
                 record_id=f"ws:c:{n}", trade_id=str(n), px="100.50", sz="2", side="sell")


def _items() -> list[Item]:
    gap = GapEvent(gap_id="g", kind=GapKind.DISCONNECT, status=GapStatus.OPEN, reason="test", channel="trades-all",
                   inst_id="BTC-USDT", before=StreamPosition(ts=T0 + 4), detected_ts_ns=(T0 + 4) * 1_000_000)
    return [*(_trade(n) for n in range(5)), _trade(5, "ETH-USDT"), gap, *(_trade(n) for n in range(6, 9))]


async def _recv_json(ws: websockets.ClientConnection) -> dict[str, object]:
    async with asyncio.timeout(5):
        msg = await ws.recv()
    out = orjson.loads(msg)
    assert isinstance(out, dict)
    return out


def _trade_id(push: dict[str, object]) -> str:
    data = push["data"]
    assert isinstance(data, list) and isinstance(data[0], dict)
    return str(data[0]["tradeId"])


def test_a_record_is_served_in_the_push_shape_okx_sent_it_in() -> None:
    record = msgspec.structs.replace(_trade(3), event_key="trades-all:BTC-USDT:3")  # the recorder's, not OKX's
    frame = render(record)
    assert orjson.loads(frame) == {"arg": {"channel": "trades-all", "instId": "BTC-USDT"},
                                   "data": [{"instId": "BTC-USDT", "tradeId": "3", "px": "100.50", "sz": "2",
                                             "side": "sell", "ts": str(T0 + 3)}]}


async def test_pong_acks_errors_and_pushes_like_okx_then_a_disconnect_and_the_rest_after_resubscribe() -> None:
    async with ReplayServer(_items(), settle_s=0.2) as server:
        async with websockets.connect(server.url(Endpoint.BUSINESS)) as ws:
            await ws.send("ping")
            async with asyncio.timeout(5):
                assert await ws.recv() == "pong"
            await ws.send(orjson.dumps({"id": "1", "op": "subscribe", "args": [{"channel": "books",
                                                                                "instId": "BTC-USDT"}]}).decode())
            err = await _recv_json(ws)
            assert (err["event"], err["code"], err["id"]) == ("error", "60018", "1")  # books lives on /public
            await ws.send(orjson.dumps({"id": "2", "op": "subscribe", "args": [{"channel": "trades-all",
                                                                                "instId": "BTC-USDT"}]}).decode())
            assert await _recv_json(ws) == {"event": "subscribe", "arg": {"channel": "trades-all",
                                                                          "instId": "BTC-USDT"}, "id": "2"}
            got = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    got.append(_trade_id(await _recv_json(ws)))
        assert got == ["0", "1", "2", "3", "4"]  # ETH-USDT was not subscribed; then the recorded disconnect
        assert closed.value.rcvd is None  # no close frame: a lost connection, as the recorder saw it
        async with websockets.connect(server.url(Endpoint.BUSINESS)) as ws:
            await ws.send(orjson.dumps({"op": "subscribe", "args": [{"channel": "trades-all",
                                                                     "instId": "BTC-USDT"}]}).decode())
            assert (await _recv_json(ws))["event"] == "subscribe"
            rest = [_trade_id(await _recv_json(ws)) for _ in range(3)]
            assert rest == ["6", "7", "8"]
            async with asyncio.timeout(5):
                await server.finished.wait()
        assert server.disconnects == 1 and server.sent == 8


def test_only_what_okx_pushed_is_served_not_rest_records_or_the_recorders_checkpoints() -> None:
    book = BookUpdate(channel="books", inst_id="BTC-USDT", ts=T0, recv_ts_ns=T0 * 1_000_000, source=Source.WS,
                      record_id="ckpt:books:BTC-USDT:5", action=cast(BookAction, "checkpoint"), asks=(), bids=(),
                      seq_id=5)
    rest = msgspec.structs.replace(_trade(1), source=Source.REST)
    assert [_served(i) for i in (_trade(1), rest, book, msgspec.structs.replace(book, action=BookAction.UPDATE))] \
        == [True, False, False, True]


async def test_a_recorded_frame_is_sent_verbatim_once_and_records_without_one_are_rendered() -> None:
    rows = [msgspec.structs.replace(_trade(n), conn_id="c1", recv_seq=seq) for n, seq in ((0, 1), (1, 2), (2, 2),
                                                                                           (3, 3))]
    # What OKX sent for rows 1 and 2: one push with both, in OKX's own key order and spacing.
    frame = (b'{"arg":{"channel":"trades-all","instId":"BTC-USDT"},"data":[{"instId":"BTC-USDT","tradeId":"1",'
             b'"px":"100.50","sz":"2","side":"sell","ts":"' + str(T0 + 1).encode() + b'","count":"1"},{"instId":'
             b'"BTC-USDT","tradeId":"2","px":"100.50","sz":"2","side":"sell","ts":"' + str(T0 + 2).encode() +
             b'","count":"1"}]}')
    frames = {("c1", 2): frame, ("other", 1): b"{}"}
    async with ReplayServer(rows, settle_s=0.2, frames=frames) as server, \
            websockets.connect(server.url(Endpoint.BUSINESS)) as ws:
        await ws.send(orjson.dumps({"op": "subscribe", "args": [{"channel": "trades-all",
                                                                 "instId": "BTC-USDT"}]}).decode())
        assert (await _recv_json(ws))["event"] == "subscribe"
        async with asyncio.timeout(5):
            got = [await ws.recv() for _ in range(3)]
            await server.finished.wait()
    assert got[1] == frame.decode()  # byte for byte, once for its two rows
    assert [_trade_id(orjson.loads(got[0])), _trade_id(orjson.loads(got[2]))] == ["0", "3"]  # rendered
    assert server.verbatim == 1 and server.sent == 3


def _raw(conn: str, seqs: range) -> RawFrames:
    return RawFrames(conn_id=conn, name="public-0", endpoint="/ws/v5/public", frames=tuple(
        RawFrameEntry(recv_seq=s, recv_ts_ns=(T0 + s) * 1_000_000, payload=b'{"seq":%d}' % s) for s in seqs))


async def test_the_windows_raw_frames_come_from_kafka_and_the_archive_alike(
    kafka_broker: BrokerInfo, topic_prefix: str, tmp_path: Path,
) -> None:
    raws = [_raw("c1", range(1, 4)), _raw("c2", range(1, 3)),
            _raw("late", range(10_000_000, 10_000_001))]  # received ~2.8 hours after the window: not in it
    await publish(kafka_broker.bootstrap_servers, topic_prefix, raws)
    settings = load_settings(None, kafka={"bootstrap_servers": kafka_broker.bootstrap_servers,
                                          "topic_prefix": topic_prefix, "partitions": 1})
    write_archive(tmp_path, TopicKind.RAW, [(r, Coordinates("okx.raw", 0, i, r.kafka_ts_ms()))
                                           for i, r in enumerate(raws)])
    from_kafka = await asyncio.to_thread(
        lambda: replay(f"kafka://{kafka_broker.bootstrap_servers}", T0, T0 + 10, settings=settings).raw_frames())
    from_archive = replay(str(tmp_path), T0, T0 + 10).raw_frames()
    want = {("c1", 1): b'{"seq":1}', ("c1", 2): b'{"seq":2}', ("c1", 3): b'{"seq":3}', ("c2", 1): b'{"seq":1}',
            ("c2", 2): b'{"seq":2}'}
    assert from_kafka == from_archive == want


async def test_the_server_keeps_serving_after_its_timeline_until_asked_to_stop() -> None:
    async with ReplayServer([_trade(n) for n in range(3)], settle_s=0.0) as server:
        stop = asyncio.Event()
        waiting = asyncio.create_task(server.wait(stop))
        async with websockets.connect(server.url(Endpoint.BUSINESS)) as ws:
            await ws.send(orjson.dumps({"op": "subscribe", "args": [{"channel": "trades-all",
                                                                     "instId": "BTC-USDT"}]}).decode())
            assert (await _recv_json(ws))["event"] == "subscribe"
            assert [_trade_id(await _recv_json(ws)) for _ in range(3)] == ["0", "1", "2"]
            async with asyncio.timeout(5):
                await server.finished.wait()
            await ws.send("ping")  # the timeline is over; the server is not
            async with asyncio.timeout(5):
                assert await ws.recv() == "pong"
        assert not waiting.done()
        stop.set()
        async with asyncio.timeout(5):
            ended = await waiting
        assert ended.task is None and ended.exit_code == 0


class _SmallReads(ReplayServer):
    READ_AHEAD = 4


async def test_a_window_larger_than_the_read_ahead_is_played_whole_while_reading_at_most_two_chunks_ahead() -> None:
    """A day of every instrument does not fit in memory: the player reads as it plays."""
    read: list[int] = []

    def source() -> Iterator[Item]:
        for n in range(23):
            read.append(n)
            yield _trade(n)

    async with _SmallReads(source(), settle_s=0.0) as server:
        assert len(read) == 4 and not server.whole_window_read, "only the first chunk before the first client"
        async with websockets.connect(server.url(Endpoint.BUSINESS)) as ws:
            await ws.send(orjson.dumps({"op": "subscribe", "args": [{"channel": "trades-all",
                                                                     "instId": "BTC-USDT"}]}).decode())
            assert (await _recv_json(ws))["event"] == "subscribe"
            got = []
            for _ in range(23):
                got.append(int(_trade_id(await _recv_json(ws))))
                assert len(read) <= got[-1] + 1 + 2 * _SmallReads.READ_AHEAD, "never more than two chunks ahead"
            assert got == list(range(23))
            async with asyncio.timeout(5):
                await server.finished.wait()
    async with ReplayServer([_trade(n) for n in range(3)], settle_s=0.0) as small:
        assert small.whole_window_read and small.first_items == 3


async def test_recorded_frames_are_read_as_they_are_played_never_more_than_a_margin_and_two_chunks_ahead() -> None:
    """A day of okx.raw does not fit in memory either: frames are read a chunk at a time as the timeline reaches
    their receive time, and let go once it is a margin past them. 200 trades 10 s apart, each with its recorded
    frame: the 60 s margin spans 6 of them on each side."""
    trades = [msgspec.structs.replace(_trade(n * 10_000), conn_id="c1", recv_seq=n + 1) for n in range(200)]
    margin, chunk = 6, _SmallReads.READ_AHEAD
    ahead: list[int] = []  # per frame read: how far past the records played it is
    held: list[int] = []
    server: _SmallReads | None = None

    def frames() -> Iterator[tuple[int, tuple[str, int], bytes]]:
        for n, t in enumerate(trades):
            played = server.verbatim + server.rendered if server is not None else 0
            ahead.append(n - played)
            held.append(len(server.frames) if server is not None else 0)
            yield t.ts, ("c1", n + 1), _recorded(t)

    server = _SmallReads(trades, settle_s=0.0, frames=frames())
    async with server, websockets.connect(server.url(Endpoint.BUSINESS)) as ws:
        assert server.frames.read == chunk and not server.frames.done, "only the first chunk before the first client"
        await ws.send(orjson.dumps({"op": "subscribe", "args": [{"channel": "trades-all",
                                                                 "instId": "BTC-USDT"}]}).decode())
        assert (await _recv_json(ws))["event"] == "subscribe"
        pushes = [await _recv_json(ws) for _ in range(200)]
        async with asyncio.timeout(5):
            await server.finished.wait()
    assert [_trade_id(p) for p in pushes] == [str(n * 10_000) for n in range(200)]
    assert all("recorded" in p for p in pushes) and server.verbatim == 200  # every one verbatim, in its place
    assert len(ahead) == 200
    assert max(ahead) <= margin + 2 * chunk, "never more than the margin and two chunks ahead of the timeline"
    assert max(held) <= 2 * margin + 1 + 2 * chunk, "frames a margin behind the timeline are let go"


async def test_a_source_error_past_the_first_chunk_ends_the_session_with_exit_1() -> None:
    def source() -> Iterator[Item]:
        yield from (_trade(n) for n in range(6))
        raise OSError("archive file trades/x.parquet: corrupt")

    async with _SmallReads(source(), settle_s=0.0) as server:
        waiting = asyncio.create_task(server.wait(asyncio.Event()))
        async with websockets.connect(server.url(Endpoint.BUSINESS)) as ws:
            await ws.send(orjson.dumps({"op": "subscribe", "args": [{"channel": "trades-all",
                                                                     "instId": "BTC-USDT"}]}).decode())
            assert (await _recv_json(ws))["event"] == "subscribe"
            async with asyncio.timeout(10):
                ended = await waiting
        assert ended.exit_code == 1 and isinstance(ended.error, OSError) and "corrupt" in str(ended.error)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _recorded(trade: Trade) -> bytes:
    """The frame OKX sent for `trade`: its push with a key the renderer never writes, to tell the two apart."""
    return orjson.dumps({**orjson.loads(render(trade)), "recorded": True})


async def test_raw_frames_that_reach_kafka_too_late_are_counted_in_the_api_and_serves_summary_not_dropped_silently(
    kafka_broker: BrokerInfo, topic_prefix: str,
) -> None:
    """300 trades a second apart, carried by 150 recorded okx.raw records of two frames each; one raw record
    reached its partition 120 s late (more than the 60 s reorder margin). Its 2 frames cannot be placed: the API
    (`stats.late_raw`) and `replay serve`'s end-of-session line count them, and their trades go out re-rendered."""
    trades = [msgspec.structs.replace(_trade(n * 1_000), conn_id="c1", recv_seq=n + 1) for n in range(300)]
    raws = [RawFrames(conn_id="c1", name="public-0", endpoint="/ws/v5/business", frames=tuple(
        RawFrameEntry(recv_seq=t.recv_seq or 0, recv_ts_ns=t.recv_ts_ns, payload=_recorded(t))
        for t in trades[k:k + 2])) for k in range(0, 300, 2)]
    delay = {50: 120_000}  # the raw record of trades 100 and 101
    arrival = sorted(range(len(raws)), key=lambda k: (raws[k].kafka_ts_ms() + delay.get(k, 0), k))
    await publish(kafka_broker.bootstrap_servers, topic_prefix, [*trades, *(raws[k] for k in arrival)])
    source = f"kafka://{kafka_broker.bootstrap_servers}"
    settings = load_settings(None, kafka={"bootstrap_servers": kafka_broker.bootstrap_servers,
                                          "topic_prefix": topic_prefix, "partitions": 1})

    rp = replay(source, T0, T0 + 300_000, settings=settings)
    frames = await asyncio.to_thread(rp.raw_frames)
    assert len(frames) == 298 and ("c1", 101) not in frames and ("c1", 102) not in frames
    assert rp.stats.late_raw == 2

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingest.cli", "replay", "serve", "--port", str(port), "--from", _iso(T0), "--to",
        _iso(T0 + 300_000), "--source", source, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "OKX_INGEST__KAFKA__TOPIC_PREFIX": topic_prefix})
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(60):
            banner = await proc.stdout.readline()
        assert b"(298 recorded frames verbatim)" in banner, banner
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/v5/business") as ws:
            await ws.send(orjson.dumps({"op": "subscribe", "args": [{"channel": "trades-all",
                                                                     "instId": "BTC-USDT"}]}).decode())
            assert (await _recv_json(ws))["event"] == "subscribe"
            pushes = [await _recv_json(ws) for _ in range(300)]
            async with asyncio.timeout(30):  # printed once the timeline is played through (after the log lines)
                while not (summary := (await proc.stderr.readline()).decode()).startswith("okx-ingest: served"):
                    assert summary, "no summary line"
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            rc = await proc.wait()
    assert rc == 0
    assert [_trade_id(p) for p in pushes] == [str(n * 1_000) for n in range(300)]
    assert [n for n, p in enumerate(pushes) if "recorded" not in p] == [100, 101]  # re-rendered, not lost
    assert summary.strip() == ("okx-ingest: served 300 pushes (298 recorded frames verbatim, 2 re-rendered), "
                               "0 disconnects, the window played through; 0 late records left out, 2 late raw "
                               "frames left out (over 60 s out of order; their records re-rendered)")
