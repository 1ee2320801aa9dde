"""Order-book throughput: `OrderBook.apply` against `orjson.loads` of the same frames as a baseline.

Plain script (`.venv/bin/python bench/books_bench.py`): prints per-message costs and the ratio
apply/parse, for the real 2022 `books` recording (checksum verified on every frame) and for a synthetic
400-level book with small seqId-chained updates and `checksum: 0` (what OKX sends since 2026-06-23).
The ratio, not the absolute time, is what to compare across machines.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ingest.core.books import BookMessage, OrderBook, VerdictKind  # noqa: E402

FRAMES = ROOT.parent / "shared" / "okx" / "frames" / "books.jsonl"


def best_of(fn: Callable[[], object], repeat: int = 5) -> float:
    """Fastest of `repeat` runs, in seconds (least disturbed by the rest of the machine)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def to_message(frame: dict[str, Any]) -> tuple[str, BookMessage]:
    d = frame["data"][0]
    msg = BookMessage(
        snapshot=frame["action"] == "snapshot", bids=d["bids"], asks=d["asks"], ts=int(d["ts"]),
        checksum=d.get("checksum"), seq_id=d.get("seqId"), prev_seq_id=d.get("prevSeqId"),
    )
    return frame["arg"]["instId"], msg


def parse_all(raw: list[bytes]) -> None:
    """Parse and discard, as a streaming pipeline does (keeping 50k dicts alive would time the GC instead)."""
    loads = orjson.loads
    for r in raw:
        loads(r)


def apply_all(messages: list[tuple[str, BookMessage]]) -> None:
    books: dict[str, OrderBook] = {}
    for inst, msg in messages:
        book = books.get(inst)
        if book is None:
            book = books[inst] = OrderBook()
        verdict = book.apply(msg)
        if verdict.kind is VerdictKind.BROKEN:
            raise SystemExit(f"unexpected break: {verdict}")


def synthetic(n_updates: int, seed: int = 7) -> tuple[list[bytes], list[tuple[str, BookMessage]]]:
    """A 400-level book, then updates of 1-6 levels near the touch (70% overwrite, 15% delete, 15% new)."""
    rng = random.Random(seed)
    tick = 1
    bid_px = [100_000 - i * tick for i in range(400)]
    ask_px = [100_001 + i * tick for i in range(400)]

    def px(p: int) -> str:
        return f"{p / 10:.1f}"

    def lvl(p: int) -> list[str]:
        return [px(p), str(rng.randint(1, 5000)), "0", str(rng.randint(1, 9))]

    frames: list[dict[str, Any]] = [{
        "arg": {"channel": "books", "instId": "SYN-USDT"}, "action": "snapshot",
        "data": [{"bids": [lvl(p) for p in bid_px], "asks": [lvl(p) for p in ask_px], "ts": "1",
                  "checksum": 0, "seqId": 10, "prevSeqId": -1}],
    }]
    bids, asks = set(bid_px), set(ask_px)
    seq = 10
    for i in range(n_updates):
        upd: dict[str, list[list[str]]] = {"bids": [], "asks": []}
        for _ in range(rng.randint(1, 6)):
            side, book, sign = (("bids", bids, -1), ("asks", asks, 1))[rng.random() < 0.5]
            r = rng.random()
            if r < 0.7:
                p = rng.choice(sorted(book, reverse=sign < 0)[:50])
                upd[side].append(lvl(p))
            elif r < 0.85 and len(book) > 300:
                p = rng.choice(sorted(book, reverse=sign < 0)[:50])
                book.discard(p)
                upd[side].append([px(p), "0", "0", "0"])
            else:
                edge = max(book) if sign < 0 else min(book)
                p = edge - sign * rng.randint(1, 40)
                if p in bids or p in asks:
                    continue
                book.add(p)
                upd[side].append(lvl(p))
        nxt = seq + rng.randint(1, 30)
        frames.append({"arg": {"channel": "books", "instId": "SYN-USDT"}, "action": "update",
                       "data": [{**upd, "ts": str(2 + i), "checksum": 0, "seqId": nxt, "prevSeqId": seq}]})
        seq = nxt
    raw = [orjson.dumps(f) for f in frames]
    return raw, [to_message(orjson.loads(r)) for r in raw]


def report(name: str, raw: list[bytes], messages: list[tuple[str, BookMessage]]) -> None:
    parse = best_of(lambda: parse_all(raw))
    apply = best_of(lambda: apply_all(messages))
    n = len(messages)
    print(f"{name}: {n} messages")
    print(f"  orjson.loads   {parse / n * 1e6:8.2f} us/msg")
    print(f"  OrderBook.apply {apply / n * 1e6:7.2f} us/msg   ({n / apply:,.0f} msg/s)")
    print(f"  ratio apply/parse {apply / parse:6.2f}")


def main() -> None:
    raw = [line for line in FRAMES.read_bytes().splitlines() if line.strip()]
    report("real 2022 books (400 levels, CRC32 verified on every frame)", raw,
           [to_message(orjson.loads(r)) for r in raw])
    report("synthetic books (400 levels, 1-6 level updates, checksum 0, seqId chain)", *synthetic(50_000))


if __name__ == "__main__":
    main()
