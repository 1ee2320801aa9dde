"""`make bench-picows`: would a compiled frame reader change the recorder's CPU per frame? (issue 16)

The product reads OKX with websockets; picows is a Cython WebSocket client. This bench answers the issue's
question on the whole recorder rather than on a bare client: in one run, on the same feeder (the simulator in its
own process) and the same embedded broker, it measures the CPU per frame of

* the websockets floor: a bare websockets client that only receives and `orjson.loads` the frames;
* the picows floor: the same with picows (`bench.picows_link`);
* the recorder on websockets: `ConnectionManager` -> inbox -> normalize -> encode -> delivery (journal, raw topic);
* the recorder on picows: the same pipeline with picows reading the sockets (`bench.picows_link`);

on trades flat out, trades paced (one rate for both recorders: half of the websockets recorder's flat-out rate)
and the mixed book-heavy load (`--mixed` instruments x trades, books, tickers). The paced rows are divided by the
flat-out floors, as `make bench` does. `--rounds` repeats everything, the order of the two transports swapped
every other round, and reports medians. picows is not a dependency of the project: without it, the bench says
"picows not installed" and measures the websockets rows only.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from bench.pipeline import (
    MIXED_CHANNELS,
    MIXED_HZ,
    Feeder,
    Floor,
    floor_run,
    int_list,
    journal_extra,
    mixed_floor,
    mixed_recorder,
    paced_run,
    start_recorder,
    throughput_run,
)
from ingest.io.broker import EmbeddedBroker

if TYPE_CHECKING:
    from bench.pipeline import ConnectionsFactory

#: The rows of one round, in the report's order.
WS_FLOOR = "websockets floor"
PICOWS_FLOOR = "picows floor"
REC_WS = "recorder on websockets"
REC_PICOWS = "recorder on picows"
_BOOKS_PER_CONN = 29  # as `bench.pipeline.mixed_floor` (and the recorder's default plan) packs books


def picows_missing() -> str | None:
    """Why the picows rows cannot run, or None."""
    if importlib.util.find_spec("picows") is None:
        return "picows not installed: `.venv/bin/pip install picows` (bench only; the product stays on websockets)"
    return None


def _picows() -> ConnectionsFactory:
    """The recorder's WebSocket side on picows (imported here: only a run with picows installed gets here)."""
    from bench.picows_link import PicowsConnections

    return PicowsConnections


async def picows_floor_run(feeder: Feeder, inst: str, n: int, compression: bool) -> Floor:
    """`bench.pipeline.floor_run` with picows: receive + `orjson.loads` of `n` trades-all frames."""
    from bench.picows_link import Counter, close_reader, subscribed_floor

    counter = Counter()
    reader = await subscribed_floor(f"{feeder.ws_base}/ws/v5/business", [{"channel": "trades-all", "instId": inst}],
                                    compression, counter)
    try:
        await counter.wait_for(1, 30)  # the subscribe ack
        pump = asyncio.create_task(feeder.pump([inst], n))
        start, cpu = time.perf_counter(), time.process_time()
        await counter.wait_for(1 + n, 600)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        await pump
    finally:
        await close_reader(reader)
    return Floor(n / elapsed, cpu / n * 1e6)


async def picows_mixed_floor(feeder: Feeder, insts: Sequence[str], seconds: float, compression: bool) -> Floor:
    """`bench.pipeline.mixed_floor` with picows: the same subscriptions over as many connections."""
    from bench.picows_link import Counter, close_reader, subscribed_floor

    counter = Counter()
    chunks = [insts[i:i + _BOOKS_PER_CONN] for i in range(0, len(insts), _BOOKS_PER_CONN)]
    readers = [await subscribed_floor(f"{feeder.ws_base}/ws/v5/public",
                                      [{"channel": c, "instId": i} for i in chunk for c in MIXED_CHANNELS],
                                      compression, counter) for chunk in chunks]
    try:
        await feeder.ticks(insts, MIXED_CHANNELS, 1.0, MIXED_HZ)  # warm-up: snapshots, first updates
        start_got, t0, c0 = counter.got, time.perf_counter(), time.process_time()
        sent = await feeder.ticks(insts, MIXED_CHANNELS, seconds, MIXED_HZ)
        await counter.wait_for(start_got + sent, 120)
        t1, c1 = time.perf_counter(), time.process_time()
    finally:
        for reader in readers:
            await close_reader(reader)
    return Floor(sent / (t1 - t0), (c1 - c0) / max(1, sent) * 1e6)


#: One round's figures: row -> load -> CPU µs per frame (and a few extras under other keys).
Round = dict[str, dict[str, float]]


async def trades_round(args: argparse.Namespace, feeder: Feeder, inst: str, bootstrap: str, picows_first: bool,
                       rate: int | None) -> tuple[Round, int]:
    """Floors and recorders on trades flat out and paced; returns the figures and the paced rate used."""
    compression = not args.no_compression
    extra = journal_extra(args)
    out: Round = {WS_FLOOR: {}, PICOWS_FLOOR: {}, REC_WS: {}, REC_PICOWS: {}}
    floors: list[tuple[str, Callable[[], Awaitable[Floor]]]] = [
        (WS_FLOOR, lambda: floor_run(feeder, inst, args.messages, compression))]
    recorders: list[tuple[str, ConnectionsFactory | None]] = [(REC_WS, None)]
    if args.picows:
        floors.append((PICOWS_FLOOR, lambda: picows_floor_run(feeder, inst, args.messages, compression)))
        recorders.append((REC_PICOWS, _picows()))
    if picows_first:
        floors.reverse()
        recorders.reverse()
    for row, run in floors:
        floor = await run()
        out[row].update(flat=floor.cpu_us_per_msg, flat_msgs_s=floor.msgs_s)
    for row, connections in recorders:
        with tempfile.TemporaryDirectory(prefix="okx-bench-") as tmp:
            rec = await start_recorder(feeder.ws_base, bootstrap, [inst], Path(tmp), not args.no_raw, compression,
                                       extra, connections=connections)
            try:
                await throughput_run(rec, feeder, inst, min(5_000, args.messages))  # warm-up
                thr = await throughput_run(rec, feeder, inst, args.messages)
                if rate is None:  # the first recorder of the run sets it: half of its flat-out rate
                    rate = args.rate or max(100, int(thr["msgs_s"] / 2))
                paced = await paced_run(rec, feeder, [inst], rate, args.paced_s)
            finally:
                await rec.close()
        out[row].update(flat=thr["cpu_us_per_msg"], flat_msgs_s=thr["msgs_s"], paced=paced["cpu_us_per_msg"],
                        paced_p99_ms=paced["p99_ms"])
    assert rate is not None
    return out, rate


async def mixed_round(args: argparse.Namespace, n: int, bootstrap: str, picows_first: bool) -> Round:
    """Floors and recorders on the mixed load at `n` instruments, on a feeder simulating exactly those."""
    compression = not args.no_compression
    insts = [f"MIX{i}-USDT" for i in range(n)]
    load = f"mixed {n}"
    out: Round = {WS_FLOOR: {}, PICOWS_FLOOR: {}, REC_WS: {}, REC_PICOWS: {}}
    feeder = Feeder(insts)
    try:
        floors: list[tuple[str, Callable[[], Awaitable[Floor]]]] = [
            (WS_FLOOR, lambda: mixed_floor(feeder, insts, args.mixed_s, compression))]
        recorders: list[tuple[str, ConnectionsFactory | None]] = [(REC_WS, None)]
        if args.picows:
            floors.append((PICOWS_FLOOR, lambda: picows_mixed_floor(feeder, insts, args.mixed_s, compression)))
            recorders.append((REC_PICOWS, _picows()))
        if picows_first:
            floors.reverse()
            recorders.reverse()
        for row, run in floors:
            out[row][load] = (await run()).cpu_us_per_msg
        for row, connections in recorders:
            m = await mixed_recorder(args, feeder, insts, bootstrap, journal_extra(args), connections)
            out[row].update({load: m["cpu_us_per_msg"], f"{load} frames_s": m["frames_s"]})
    finally:
        feeder.stop()
    return out


async def main_async(args: argparse.Namespace) -> int:
    broker = EmbeddedBroker()
    await broker.start()
    rounds: list[Round] = []
    rate: int | None = None
    try:
        feeder = Feeder(["BENCH0-USDT"])
        try:
            for i in range(args.rounds):
                figures, rate = await trades_round(args, feeder, "BENCH0-USDT", broker.bootstrap_servers,
                                                   picows_first=i % 2 == 1, rate=rate)
                rounds.append(figures)
        finally:
            feeder.stop()
        for i in range(args.rounds):
            for n in args.mixed:
                mixed = await mixed_round(args, n, broker.bootstrap_servers, picows_first=i % 2 == 1)
                for row, values in mixed.items():
                    rounds[i][row].update(values)
    finally:
        await broker.stop()
    assert rate is not None
    report(args, rounds, rate)
    return 0


def median_of(rounds: Sequence[Round], row: str, key: str) -> float:
    values = [r[row][key] for r in rounds if key in r[row]]
    return statistics.median(values) if values else float("nan")


def median_ratio(rounds: Sequence[Round], top: tuple[str, str], bottom: tuple[str, str]) -> float:
    """The median over rounds of one figure over another: each round's pair shares that round's machine."""
    values = [r[top[0]][top[1]] / r[bottom[0]][bottom[1]] for r in rounds
              if top[1] in r[top[0]] and bottom[1] in r[bottom[0]]]
    return statistics.median(values) if values else float("nan")


def _us(value: float, width: int) -> str:
    return f"{value:>{width - 3}.1f} us" if value == value else f"{'skipped':>{width}}"


def _x(value: float, width: int) -> str:
    return f"{value:>{width - 1}.2f}x" if value == value else f"{'-':>{width}}"


def report(args: argparse.Namespace, rounds: Sequence[Round], rate: int) -> None:
    loads = ["flat", "paced"] + [f"mixed {n}" for n in args.mixed]
    labels = {"flat": "trades flat out", "paced": f"trades paced at {rate:,}/s"}
    labels.update({f"mixed {n}": f"mixed {n} x ({', '.join(MIXED_CHANNELS)})" for n in args.mixed})
    versions = {p: _version(p) for p in ("websockets", "picows")}
    print(f"\npicows on the whole recorder: CPU per frame, medians of {len(rounds)} round(s); "
          f"{args.messages:,} trades-all frames, mixed load {args.mixed_s:.0f} s of ticks at {MIXED_HZ:.0f}/s; "
          f"permessage-deflate {'off' if args.no_compression else 'on'}, raw topic {'off' if args.no_raw else 'on'}, "
          f"journal {journal_extra(args) or 'defaults'}; websockets {versions['websockets']}, "
          f"picows {versions['picows']}, Python {sys.version.split()[0]}\n")
    print(f"{'load':<36}{'ws floor':>11}{'picows fl.':>11}{'rec on ws':>11}{'rec picows':>11}"
          f"{'ws rec/ws fl.':>15}{'picows rec/ws fl.':>19}{'picows rec/ws rec':>19}")
    for load in loads:
        fk = "flat" if load == "paced" else load  # paced rows over the flat-out floors, as `make bench` does
        floors = (f"{_us(median_of(rounds, WS_FLOOR, fk), 11)}{_us(median_of(rounds, PICOWS_FLOOR, fk), 11)}"
                  if load != "paced" else f"{'(flat)':>11}{'(flat)':>11}")
        print(f"{labels[load]:<36}{floors}{_us(median_of(rounds, REC_WS, load), 11)}"
              f"{_us(median_of(rounds, REC_PICOWS, load), 11)}"
              f"{_x(median_ratio(rounds, (REC_WS, load), (WS_FLOOR, fk)), 15)}"
              f"{_x(median_ratio(rounds, (REC_PICOWS, load), (WS_FLOOR, fk)), 19)}"
              f"{_x(median_ratio(rounds, (REC_PICOWS, load), (REC_WS, load)), 19)}")
    floor_loads = ["flat", *loads[2:]]
    ratios = [f"{labels[k]} {_x(median_ratio(rounds, (PICOWS_FLOOR, k), (WS_FLOOR, k)), 0).strip()}"
              for k in floor_loads]
    print("\npicows floor / websockets floor (CPU per frame): " + ", ".join(ratios))
    rows = (WS_FLOOR, PICOWS_FLOOR, REC_WS, REC_PICOWS) if args.picows else (WS_FLOOR, REC_WS)
    print("frames/s flat out: " + ", ".join(f"{row} {median_of(rounds, row, 'flat_msgs_s'):,.0f}" for row in rows))
    print("receive -> ack p99 paced: " + ", ".join(f"{row} {median_of(rounds, row, 'paced_p99_ms'):.1f} ms"
                                                  for row in rows[len(rows) // 2:]))
    if not args.picows:
        print(f"\n{picows_missing()}: the picows rows were skipped")
    if args.json:
        print("JSON " + orjson.dumps({"rate": rate, "rounds": list(rounds), "versions": versions}).decode())


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make bench-picows", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=1, help="repeat everything; medians are reported")
    p.add_argument("--messages", type=int, default=100_000, help="trades-all frames per flat-out run")
    p.add_argument("--rate", type=int, default=0, help="paced runs: msgs/s (default: half the ws recorder's flat out)")
    p.add_argument("--paced-s", type=float, default=5.0)
    p.add_argument("--mixed", type=int_list, default=[100],
                   help="instrument counts of the mixed load (comma-separated; empty string: skip it)")
    p.add_argument("--mixed-s", type=float, default=5.0, help="mixed load: seconds of market ticks per run")
    p.add_argument("--sync-interval-ms", type=int, default=None, help="journal.sync_interval_ms (0: every batch)")
    p.add_argument("--cursor-interval-ms", type=int, default=None,
                   help="journal.cursor_interval_ms (0: every acknowledgement)")
    p.add_argument("--json", action="store_true", help="also print every round's figures as one JSON line")
    p.add_argument("--no-raw", action="store_true", help="do not publish okx.raw")
    p.add_argument("--no-compression", action="store_true", help="no permessage-deflate, on either transport")
    p.set_defaults(profile=None, mixed_floor_s=0.0)
    args = p.parse_args(argv)
    missing = picows_missing()
    args.picows = missing is None
    if missing is not None:
        print(f"bench-picows: {missing}; its rows are skipped", file=sys.stderr)
    try:
        import uvloop

        return uvloop.run(main_async(args))
    except ImportError:  # pragma: no cover
        return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
