"""The pipeline alone on the mixed load: normalize, stream ownership, books, gaps and Avro encoding per frame.

`make bench` measures the whole recorder against a bare client; this isolates our own hot path, without the
network, websockets or delivery, so a change to it can be compared in seconds. It records the simulator's
mixed load (instruments x trades, books, tickers, market ticks as in `make bench`) once over a local
WebSocket, then feeds the same frames, in receive order and in batches like the pipeline task takes them, to a
fresh `Pipeline` whose outlet drops what it is given. Baseline of the same run: `orjson.loads` of each frame.

    .venv/bin/python -m bench.pipeline_core_bench [--instruments 100] [--seconds 5] [--repeat 5] [--profile PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import secrets
import sys
import time
from collections.abc import Sequence

import orjson
import websockets

from ingest.core.avro import RecordEncoder
from ingest.core.events import Inbound, InboundFrame, LinkEvent, LinkEventKind
from ingest.io.sink import EncodedRecord
from ingest.okx.channels import Endpoint, SubArg
from ingest.services.pipeline import BATCH, Pipeline

CHANNELS = ("trades", "books", "tickers")
PER_CONN = 29  # instruments per connection, as the recorder packs books


class _Drop:
    """An outlet that keeps nothing: only the pipeline's own work is timed."""

    records = 0

    async def put_many(self, records: Sequence[EncodedRecord]) -> None:
        self.records += len(records)


async def record_frames(n: int, seconds: float) -> tuple[list[LinkEvent], list[InboundFrame]]:
    """The simulator's mixed load at `n` instruments, as the pipeline would receive it."""
    from ingest.sim import SimConfig, SimServer

    insts = [f"MIX{i}-USDT" for i in range(n)]
    config = SimConfig(instruments=tuple(insts), seed=3, api_key=secrets.token_hex(8),
                       api_secret=secrets.token_hex(16), passphrase=secrets.token_hex(8), idle_timeout_s=600.0,
                       max_queue_frames=10_000_000, flush_timeout_s=600.0, connect_limit=1000)
    frames: list[InboundFrame] = []
    links: list[LinkEvent] = []
    async with SimServer(config) as sim:
        async def reader(k: int, chunk: Sequence[str], ready: asyncio.Event, stop: asyncio.Event) -> None:
            conn, seq = f"public-{k}#1", 0
            args = [{"channel": c, "instId": i} for i in chunk for c in CHANNELS]
            links.append(LinkEvent(LinkEventKind.SUBSCRIBED, conn, f"public-{k}", time.time_ns(),
                                   tuple(SubArg(c, i) for i in chunk for c in CHANNELS)))
            async with websockets.connect(f"{sim.ws_base}/ws/v5/public", max_size=None) as ws:
                await ws.send(orjson.dumps({"op": "subscribe", "args": args}).decode())
                ready.set()
                while not stop.is_set():
                    try:
                        async with asyncio.timeout(0.2):  # to notice `stop` when the simulator is quiet
                            data = await ws.recv(decode=False)
                    except TimeoutError:
                        continue
                    if data.startswith(b'{"arg"'):
                        seq += 1
                        frames.append(InboundFrame(conn, f"public-{k}", Endpoint.PUBLIC, seq, time.time_ns(),
                                                   data))

        stop = asyncio.Event()
        chunks = [insts[i:i + PER_CONN] for i in range(0, n, PER_CONN)]
        readies = [asyncio.Event() for _ in chunks]
        tasks = [asyncio.create_task(reader(k, c, r, stop)) for k, (c, r) in enumerate(zip(chunks, readies,
                                                                                           strict=True))]
        for r in readies:
            await r.wait()
        for inst in insts:
            for channel in CHANNELS:
                await sim.wait_subscribed(SubArg(channel, inst), timeout=120)
        for _ in range(int(seconds * 10)):
            await sim.tick(1)
        await sim.flush()
        await asyncio.sleep(0.5)  # the last frames in flight on loopback
        stop.set()
        await asyncio.gather(*tasks)
    return links, frames


async def run_pipeline(links: list[LinkEvent], frames: list[InboundFrame]) -> tuple[float, int]:
    """CPU seconds of one fresh pipeline over every frame, and the records it handed over."""
    outlet = _Drop()
    pipeline = Pipeline(asyncio.Queue(), outlet, RecordEncoder("bench."), publish_raw=True)
    items: list[Inbound] = [*links, *frames]
    c0 = time.process_time()
    for i in range(0, len(items), BATCH):
        await pipeline.handle_many(items[i:i + BATCH])
    return time.process_time() - c0, outlet.records


def parse_floor(frames: list[InboundFrame]) -> float:
    loads = orjson.loads
    c0 = time.process_time()
    for f in frames:
        loads(f.data)
    return time.process_time() - c0


async def main_async(args: argparse.Namespace) -> int:
    links, frames = await record_frames(args.instruments, args.seconds)
    kinds = {c: sum(1 for f in frames if f.data.startswith(b'{"arg":{"channel":"' + c.encode() + b'"'))
             for c in CHANNELS}
    pipe, floor, records = [], [], 0
    for _ in range(args.repeat):
        cpu, records = await run_pipeline(links, frames)
        pipe.append(cpu)
        floor.append(parse_floor(frames))
    if args.profile:
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
        await run_pipeline(links, frames)
        profiler.disable()
        profiler.dump_stats(args.profile)
    n = len(frames)
    best, base = min(pipe), min(floor)
    print(f"pipeline core, {args.instruments} instruments x {', '.join(CHANNELS)}: {n:,} frames "
          f"({', '.join(f'{k} {v:,}' for k, v in kinds.items())}), {records:,} records, best of {args.repeat}")
    print(f"  pipeline (normalize .. encode)  {best / n * 1e6:8.2f} us/frame")
    print(f"  orjson.loads (same run)         {base / n * 1e6:8.2f} us/frame")
    print(f"  ratio                           {best / base:8.2f}x")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pipeline_core_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instruments", type=int, default=100)
    p.add_argument("--seconds", type=float, default=5.0, help="seconds of market ticks (10 a second)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--profile", metavar="PATH", default=None, help="also cProfile one more pass into PATH")
    return asyncio.run(main_async(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
