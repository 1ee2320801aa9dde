"""How fast is normalize + encode, relative to just parsing the same frames with orjson?

    .venv/bin/python -m bench.normalize_bench [--seconds 1.0]

Frames are the real OKX recordings in ../shared/okx/frames (trades with count/source/seqId from 2026, the
2022 400-level `books` stream, 2026 books5). Trade frames are replayed with fresh tradeIds and timestamps so
nothing is served from a cache. Each workload runs in the same process, one core, best of several rounds;
the ratio column is throughput divided by bare `orjson.loads` of the same frames, measured in this run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson

from ingest.core.avro import RecordEncoder
from ingest.core.events import InboundFrame
from ingest.core.normalize import BookPush, RecordPush, TradePush, normalize
from ingest.okx.channels import Endpoint

FRAMES = Path(__file__).resolve().parents[2] / "shared" / "okx" / "frames"


def trade_frames(count: int) -> list[bytes]:
    """`count` trade frames in the 2026 format, cycling the recorded ones with increasing tradeIds."""
    lines = (FRAMES / "ccxt_2026_trades.jsonl").read_bytes().splitlines()
    base = [orjson.loads(line) for line in lines if line.strip()]
    out: list[bytes] = []
    for i in range(count):
        msg = base[i % len(base)]
        row = dict(msg["data"][0])
        row["tradeId"] = str(int(row["tradeId"]) + i)
        row["ts"] = str(int(row["ts"]) + i)
        row["seqId"] = int(row["seqId"]) + i
        out.append(orjson.dumps({"arg": msg["arg"], "data": [row]}))
    return out


def book_frames(path: str) -> list[bytes]:
    return [line for line in (FRAMES / path).read_bytes().splitlines() if line.strip()]


def inbound(frames: Sequence[bytes]) -> list[InboundFrame]:
    return [InboundFrame("public-0#1", "public-0", Endpoint.PUBLIC, i + 1, 1_786_540_436_000_000_000 + i, data)
            for i, data in enumerate(frames)]


def best_rate(work: Callable[[], int], seconds: float) -> float:
    """Messages per second of `work` (which returns how many it handled), best of rounds within `seconds`."""
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        n = work()
        elapsed = time.perf_counter() - start
        best = max(best, n / elapsed)
        if time.perf_counter() > deadline:
            return best


def run(seconds: float) -> list[tuple[str, str, float, float]]:
    encoder = RecordEncoder("okx.")
    workloads = {
        "trades (1 trade/msg)": trade_frames(20_000),
        "books (2022, 400-level, 3 snapshots + 287 updates)": book_frames("cryptofeed_2022_books.jsonl"),
        "books5 (2026)": book_frames("ccxt_2026_books5.jsonl") * 250,
    }
    rows: list[tuple[str, str, float, float]] = []
    for name, frames in workloads.items():
        frames_in = inbound(frames)

        def parse_only(frames: Sequence[bytes] = frames) -> int:
            for data in frames:
                orjson.loads(data)
            return len(frames)

        def normalize_only(frames_in: Sequence[InboundFrame] = frames_in) -> int:
            for frame in frames_in:
                result = normalize(frame)
                if not isinstance(result, TradePush | BookPush | RecordPush):
                    raise SystemExit(f"benchmark frame did not normalize: {result}")
            return len(frames_in)

        def normalize_encode(frames_in: Sequence[InboundFrame] = frames_in) -> int:
            for frame in frames_in:
                result = normalize(frame)
                assert isinstance(result, TradePush | BookPush | RecordPush)
                for record in result.records:
                    encoder.encode(record)
            return len(frames_in)

        base = best_rate(parse_only, seconds)
        for label, work in (("orjson.loads", parse_only), ("normalize", normalize_only),
                            ("normalize+encode", normalize_encode)):
            rate = base if work is parse_only else best_rate(work, seconds)
            rows.append((name, label, rate, rate / base))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement (default 1.0)")
    args = parser.parse_args(argv)
    if not FRAMES.is_dir():
        print(f"frames not found at {FRAMES}: clone the repository beside shared/", file=sys.stderr)
        return 2
    print(f"{'workload':52} {'stage':18} {'msgs/s':>10} {'us/msg':>8} {'vs orjson':>9}")
    for name, label, rate, ratio in run(args.seconds):
        print(f"{name:52} {label:18} {rate:10,.0f} {1e6 / rate:8.2f} {ratio:9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
