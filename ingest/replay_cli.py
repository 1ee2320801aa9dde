"""`okx-ingest replay`: a window of recorded streams to a file, with a progress bar and a summary line.

Only argparse at import time (`okx-ingest --help` stays fast); the replay machinery loads when it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from ingest.config import Settings
    from ingest.core.replay import BookSnapshots, Item
    from ingest.replay import Replay

FORMATS = ("jsonl", "csv", "parquet", "hftbacktest")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The replay subcommand's options (ingest/cli.py calls this)."""
    p.add_argument("mode", nargs="?", choices=["serve"], help="serve: an OKX WebSocket server replaying the window")
    p.add_argument("--from", dest="start", required=True, help="ISO-8601 start (inclusive, UTC without a zone)")
    p.add_argument("--to", dest="end", required=True, help="ISO-8601 end (exclusive)")
    p.add_argument("--config", type=Path, default=None, help="TOML settings file (its Kafka settings)")
    p.add_argument("--inst", action="append", default=None, help="instId to replay (repeatable; default: all)")
    p.add_argument("--channel", action="append", default=None, help="channel to replay (repeatable; default: all)")
    p.add_argument("--source", default="kafka", help="kafka | kafka://HOST:PORT | archive PATH | s3://bucket/prefix")
    p.add_argument("--view", choices=["repaired", "recorded"], default="repaired")
    p.add_argument("--book-snapshots", default=None, metavar="DEPTH:INTERVAL_MS",
                   help="emit the top DEPTH levels of every valid book every INTERVAL_MS of exchange time")
    p.add_argument("--format", choices=FORMATS, default="jsonl")
    p.add_argument("--out", default="-", help="output file, or - for stdout")
    p.add_argument("--lenient", action="store_true",
                   help="replay around an unreadable archive file and report it as a gap item")
    p.add_argument("--port", type=int, default=8765, help="serve: the port to listen on")
    p.add_argument("--host", default="127.0.0.1", help="serve: the address to listen on")
    p.add_argument("--speed", type=float, default=0.0, help="serve: X times real time (0: as fast as the client reads)")


def _book_snapshots(text: str | None) -> BookSnapshots | None:
    from ingest.core.replay import BookSnapshots
    from ingest.replay import ReplayError

    if text is None:
        return None
    try:
        depth, interval = (int(x) for x in text.split(":"))
        return BookSnapshots(depth, interval)
    except ValueError:
        raise ReplayError(f"--book-snapshots {text!r}: expected DEPTH:INTERVAL_MS with both > 0, e.g. 10:1000") \
            from None


def _guard_output(out: str, source: str) -> None:
    """Replay never writes into what it reads: refuse an output file inside the archive it replays."""
    from ingest.replay import ReplayError

    if out == "-" or "://" in source or source == "kafka":
        return
    root = Path(source).resolve()
    target = Path(out).resolve()
    if target == root or root in target.parents:
        raise ReplayError(f"--out {out} is inside the archive {source} being replayed; write elsewhere")


def _progress(items: Iterator[Item], rp: Replay, enabled: bool) -> Iterator[Item]:
    from ingest.replay.formats import item_ts

    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    span = max(1, rp.end - rp.start)
    with tqdm(total=100, unit="%", desc="replay", file=sys.stderr, leave=False,
              bar_format="{l_bar}{bar}| {n:.0f}% {postfix}") as bar:
        done = 0.0
        for n, item in enumerate(items, 1):
            if n % 4096 == 0:
                pct = min(100.0, 100.0 * (item_ts(item) - rp.start) / span)
                if pct > done:
                    bar.update(pct - done)
                    done = pct
                bar.set_postfix_str(f"{n} items", refresh=False)
            yield item


def _hftbacktest_items(items: Iterator[Item]) -> Iterator[Item]:
    """One depth channel per npz: the first incremental book channel seen; trades and gaps pass."""
    from ingest.core.records import BookUpdate
    from ingest.replay.formats import item_type

    channel: str | None = None
    for item in items:
        if isinstance(item, BookUpdate) or item_type(item) == "book_snapshot":
            if channel is None:
                channel = item.channel
            if item.channel != channel:
                continue
        yield item


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run `okx-ingest replay` (or `replay serve`); errors are IngestErrors for the caller's exit 2."""
    if args.mode == "serve":
        from ingest.replay.serve import serve_main

        return serve_main(args, settings)
    from ingest.replay import ReplayError, replay
    from ingest.replay.formats import jsonl_lines, write_csv, write_hftbacktest, write_parquet

    if args.format == "hftbacktest" and (not args.inst or len(args.inst) != 1):
        raise ReplayError("--format hftbacktest writes one instrument's events: pass exactly one --inst")
    _guard_output(args.out, args.source)
    rp = replay(args.source, args.start, args.end, instruments=args.inst, channels=args.channel, view=args.view,
                book_snapshots=_book_snapshots(args.book_snapshots), settings=settings, lenient=args.lenient,
                initial_books=args.format == "hftbacktest")
    items = _progress(iter(rp), rp, sys.stderr.isatty())
    out_is_std = args.out == "-"
    if args.format == "jsonl":
        stream: IO[bytes] = sys.stdout.buffer if out_is_std else open(args.out, "wb")  # noqa: SIM115
        try:
            for line in jsonl_lines(items):
                stream.write(line)
        finally:
            if not out_is_std:
                stream.close()
    elif args.format == "csv":
        text: IO[str] = sys.stdout if out_is_std else open(args.out, "w", newline="")  # noqa: SIM115
        try:
            write_csv(items, text)
        finally:
            if not out_is_std:
                text.close()
    elif args.format == "parquet":
        write_parquet(items, sys.stdout.buffer if out_is_std else Path(args.out))
    else:
        write_hftbacktest(_hftbacktest_items(items), sys.stdout.buffer if out_is_std else Path(args.out))
    s = rp.stats
    from ingest.replay._kafka import REORDER_MARGIN_MS

    late = (f"; {s.late} late records left out (over {REORDER_MARGIN_MS // 1000} s out of exchange-time order)"
            if rp.from_kafka else "")
    if s.late_lookback:
        late += f", {s.late_lookback} more before --from left out of the books"
    if s.items == 0:
        said = late if s.late or s.late_lookback else ""
        print(f"okx-ingest: no data in {rp.source_name} between {args.start} and {args.end} "
              f"(instruments {args.inst or 'all'}, channels {args.channel or 'all'}){said}", file=sys.stderr)
        return 0
    for problem in rp.problems:
        print(f"okx-ingest: {problem.reason} (replayed around it: --lenient)", file=sys.stderr)
    print(f"replayed {s.items} items ({s.gaps} gaps, {s.snapshots} book snapshots) from "
          f"{_iso(s.first_ts)} to {_iso(s.last_ts)} out of {rp.source_name}{late}", file=sys.stderr)
    return 0


def _iso(ms: int | None) -> str:
    from datetime import UTC, datetime

    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
