"""The archiver's memory with many instruments: the real `okx-ingest archive` process, its resident set sampled.

`.venv/bin/python -m bench.archive_memory [--instruments 1000] [--trades-per 300] [--book-updates-per 60]`
(docs/PERFORMANCE.md, "Archive memory"). Every instrument gets a 400-level book snapshot, small book updates and
trades, all of one UTC day, so with files closing only by the shared budget (`archive.max_buffer_bytes`; rotation,
idle and age closes are pushed out of reach) every instrument's files are open at once, as with a day's backlog.
The archiver runs as its own process (`okx-ingest archive --config FILE`, as deployed); its RSS is read from
/proc every 50 ms from before the first record until it has exited (VmHWM, the kernel's peak, at the last read).
Baseline of the same run: the same process idle (started, in its group, no record yet). The issue's target is
at most 512 MB with 1,000 instruments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from bench.archive_bench import DAY, publish
from ingest.core.records import BookAction, BookLevel, BookUpdate, Record, Source, Trade
from ingest.io.broker import EmbeddedBroker

OKX_INGEST = str(Path(sys.executable).with_name("okx-ingest"))
TARGET_MB = 512


def records(n_inst: int, trades_per: int, updates_per: int) -> list[Record]:
    """Per instrument: one 400-level snapshot, then its updates and trades interleaved over the day."""
    rnd = random.Random(3)
    insts = [f"M{i:04d}-USDT" for i in range(n_inst)]
    out: list[Record] = []
    for inst in insts:
        bids: tuple[BookLevel, ...] = tuple((f"{59000 - k / 10:.1f}", "1.5", "0", "2") for k in range(400))
        asks: tuple[BookLevel, ...] = tuple((f"{59100 + k / 10:.1f}", "0.7", "0", "1") for k in range(400))
        out.append(BookUpdate(channel="books", inst_id=inst, ts=DAY, recv_ts_ns=DAY * 1_000_000, source=Source.WS,
                              record_id=f"b:{inst}:0", action=BookAction.SNAPSHOT, bids=bids, asks=asks,
                              seq_id=1, prev_seq_id=-1, checksum=0))
    step = 80_000_000 // max(trades_per, updates_per, 1)
    for k in range(max(trades_per, updates_per)):
        ts = DAY + 1000 + k * step
        for j, inst in enumerate(insts):
            if k < updates_per:
                lv: BookLevel = (f"{59000 + rnd.randrange(400) / 10:.1f}", f"{rnd.randrange(500) / 100}", "0", "1")
                out.append(BookUpdate(channel="books", inst_id=inst, ts=ts, recv_ts_ns=ts * 1_000_000,
                                      source=Source.WS, record_id=f"b:{inst}:{k + 1}", action=BookAction.UPDATE,
                                      bids=(lv,), asks=(), seq_id=k + 2, prev_seq_id=k + 1, checksum=0))
            if k < trades_per:
                out.append(Trade(channel="trades", inst_id=inst, ts=ts, recv_ts_ns=ts * 1_000_000 + j,
                                 source=Source.WS, conn_id="public-0#1", recv_seq=k, record_id=f"t:{inst}:{k}",
                                 trade_id=str(10_000_000 + k), px=f"{60000 + rnd.randrange(-500, 500) / 10:.1f}",
                                 sz=f"{rnd.randrange(1, 99_999) / 100_000:.5f}",
                                 side="buy" if rnd.random() < 0.5 else "sell"))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_kb(pid: int, field: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            body = r.read().decode()
    except OSError:
        return None
    m = re.search(rf"^okx_ingest_{name}(?:_total)? ([0-9.e+]+)$", body, re.M)
    return float(m.group(1)) if m else None


def start_archiver(config: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as err:
        return subprocess.Popen([OKX_INGEST, "archive", "--config", str(config)], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)


class Sampler:
    """The process's RSS every `every_s`, on a thread-free asyncio task (the bench's own loop is idle)."""

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        self.pid, self.every_s = pid, every_s
        self.peak_kb = 0
        self.hwm_kb = 0
        self.samples = 0

    async def run(self) -> None:
        while True:
            rss, hwm = proc_kb(self.pid, "VmRSS"), proc_kb(self.pid, "VmHWM")
            if rss is None:
                return
            self.peak_kb, self.hwm_kb = max(self.peak_kb, rss), max(self.hwm_kb, hwm or 0)
            self.samples += 1
            await asyncio.sleep(self.every_s)  # sampling period, not synchronisation


async def until(predicate: Callable[[], bool], what: str, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise RuntimeError(f"the archiver exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)  # polling the process's metrics (a benchmark, not a test)


async def amain(args: argparse.Namespace) -> int:
    recs = records(args.instruments, args.trades_per, args.book_updates_per)
    n = len(recs)
    broker = EmbeddedBroker()
    await broker.start()
    try:
        with tempfile.TemporaryDirectory(prefix="okx-archive-mem-") as tmp:
            root, port, prefix = Path(tmp) / "archive", free_port(), f"mem{os.getpid()}."
            config = Path(tmp) / "archive.toml"
            config.write_text(
                f'[kafka]\nbootstrap_servers = "{broker.bootstrap_servers}"\ntopic_prefix = "{prefix}"\n'
                f'[archive]\nurl = "{root}"\ngroup_id = "{prefix}archive"\nmetrics_port = {port}\n'
                "rotate_s = 86400\nidle_close_s = 86400\nmax_open_s = 86400\n"
                f"max_file_bytes = {1 << 30}\n"
                '[obs]\nlog_level = "WARNING"\n')
            # The topics first (the archiver subscribes to what exists), then the archiver, idle.
            first_trade = next(r for r in recs if isinstance(r, Trade))
            await publish(broker.bootstrap_servers, prefix, [recs[0], first_trade])
            env = {k: v for k, v in os.environ.items() if not k.startswith(("OKX_INGEST", "OKX_API"))}
            proc = start_archiver(config, Path(tmp) / "archive.log", env)
            sampler = Sampler(proc.pid)
            try:
                await until(lambda: (metric(port, "archive_records_in") or 0) >= 2, "the archiver's first records",
                            120, proc)
                idle_kb = proc_kb(proc.pid, "VmRSS") or 0
                task = asyncio.create_task(sampler.run())
                t0 = time.monotonic()
                await publish(broker.bootstrap_servers, prefix, recs[1:])
                total = n + 1  # the snapshot of the first instrument and its first trade went twice
                await until(lambda: (metric(port, "archive_records_in") or 0) >= total, "every record consumed",
                            1200, proc)
                flushed_by_budget = metric(port, "archive_files_written") or 0
                proc.send_signal(signal.SIGTERM)  # the drain writes every open file
                rc = await asyncio.to_thread(proc.wait, 300)
                wall = time.monotonic() - t0
                await task
            finally:
                if proc.poll() is None:
                    proc.kill()
            archived = sum(f.get("records", f["rows"]) for m in root.rglob("_manifest.json")
                           for f in json.loads(m.read_text())["files"])
    finally:
        await broker.stop()
    peak = max(sampler.peak_kb, sampler.hwm_kb) / 1024
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nokx-ingest archive memory ({os.cpu_count()} cores, load {load}): "
          f"{args.instruments:,} instruments, {n:,} records (one 400-level snapshot, {args.book_updates_per} updates "
          f"and {args.trades_per} trades each), exit {rc}, {wall:.0f} s")
    print(f"  idle archiver (baseline)               {idle_kb / 1024:7.0f} MB")
    print(f"  peak RSS while archiving and draining  {peak:7.0f} MB  ({peak / (idle_kb / 1024):.1f}x idle; "
          f"target <= {TARGET_MB} MB: {'met' if peak <= TARGET_MB else 'MISSED'})")
    print(f"  files written before the drain (budget flushes) {flushed_by_budget:.0f}; records in the archive's "
          f"manifests {archived:,} of {total:,}; {sampler.samples} samples")
    return 0 if rc == 0 and archived >= total else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instruments", type=int, default=1000)
    p.add_argument("--trades-per", type=int, default=300, help="trades per instrument")
    p.add_argument("--book-updates-per", type=int, default=60, help="book updates per instrument")
    return asyncio.run(amain(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
