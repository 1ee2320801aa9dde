"""Entry point `okx-ingest`: run, demo, simulate, backfill, check, replay.

Imports are deferred to the chosen command so `okx-ingest --help` and the simulator start fast and a
broken optional part cannot stop an unrelated command.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ingest.errors import IngestError


def _iso_ms(value: str) -> int:
    """Epoch ms of an ISO-8601 date/time (UTC when no zone is given)."""
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {value!r} (e.g. 2026-11-24T10:00:00Z)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="okx-ingest", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="record OKX streams into Kafka")
    run.add_argument("--config", type=Path, default=None, help="TOML settings file")

    demo = sub.add_parser("demo", help="offline: the daemon against the local simulator and embedded broker")
    demo.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: until Ctrl-C)")

    sim = sub.add_parser("simulate", help="run the OKX simulator (WebSocket + REST on one port)")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8765)
    sim.add_argument("--scenario", type=Path, default=None, help="fault-injection scenario file")

    bf = sub.add_parser("backfill", help="run the gap backfill worker, or fetch one range with --channel")
    bf.add_argument("--config", type=Path, default=None)
    bf.add_argument("--channel", help="e.g. trades; with --inst/--since/--until fetches that range and exits")
    bf.add_argument("--inst", help="instId, e.g. BTC-USDT")
    bf.add_argument("--since", type=_iso_ms, help="ISO-8601 start (inclusive)")
    bf.add_argument("--until", type=_iso_ms, help="ISO-8601 end (exclusive)")

    check = sub.add_parser("check", help="validate the configuration and credentials, then exit")
    check.add_argument("--config", type=Path, default=None)
    check.add_argument("--offline", action="store_true",
                       help="only what needs no network: settings, credentials present, files named "
                            "(e.g. okx-ingest check --offline --config deploy/compose/recorder.toml)")

    ar = sub.add_parser("archive", help="archive every topic into partitioned Parquet (docs/ARCHIVE.md)")
    ar.add_argument("--config", type=Path, default=None)
    ar_sub = ar.add_subparsers(dest="archive_command", required=False)
    verify = ar_sub.add_parser("verify", help="re-read files against their manifests; non-zero on any problem")
    verify.add_argument("--config", type=Path, default=None, dest="sub_config")
    verify.add_argument("--date", default=None, help="YYYY-MM-DD (default: every date)")
    compact = ar_sub.add_parser("compact", help="merge each partition's small files of one date")
    compact.add_argument("--config", type=Path, default=None, dest="sub_config")
    compact.add_argument("--date", required=True, help="YYYY-MM-DD")

    from ingest.replay_cli import add_arguments as replay_arguments

    replay_arguments(sub.add_parser("replay", help="replay a window from Kafka or the archive (docs/REPLAY.md)"))
    return p


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "simulate":
            from ingest.sim.server import main as sim_main

            sim_argv = ["--host", args.host, "--port", str(args.port)]
            if args.scenario:
                sim_argv += ["--scenario", str(args.scenario)]
            return sim_main(sim_argv)

        from ingest.config import load_settings

        if args.command == "demo":
            from ingest.demo import run_demo

            return _run(run_demo(seconds=args.seconds))
        settings = load_settings(getattr(args, "sub_config", None) or args.config)
        if args.command == "archive":
            return _archive(args, settings)
        if args.command == "run":
            from ingest.supervisor import run_daemon

            return _run(run_daemon(settings))
        if args.command == "check":
            from ingest.check import check

            return _run(check(settings, offline=args.offline))
        if args.command == "backfill":
            from ingest.services.backfill import backfill_range, run_worker

            if args.channel:
                missing = [n for n in ("inst", "since", "until") if getattr(args, n) is None]
                if missing:
                    raise SystemExit(f"backfill --channel needs --{', --'.join(missing)}")
                return _run(_count_to_rc(backfill_range(settings, args.channel, args.inst, args.since,
                                                        args.until, sys.stderr.isatty())))
            return _run(run_worker(settings))
        if args.command == "replay":
            from ingest.replay_cli import run as run_replay

            return run_replay(args, settings)
    except IngestError as exc:
        print(f"okx-ingest: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


def _archive(args: argparse.Namespace, settings: Any) -> int:
    """`okx-ingest archive [verify|compact]`."""
    if args.archive_command is None:
        from ingest.services.archive import run_archiver

        return _run(run_archiver(settings))
    from ingest.services.archive import open_store
    from ingest.services.archive_tools import compact, verify

    store = open_store(settings.archive)
    if args.archive_command == "verify":
        problems = verify(store, date=args.date)
        for p in problems:
            print(p, file=sys.stderr)
        print(f"archive verify: {len(problems)} problem(s) in {store.url}", file=sys.stderr)
        return 1 if problems else 0
    report = compact(store, date=args.date, min_bytes=settings.archive.compact_min_bytes,
                     target_bytes=settings.archive.compact_target_bytes)
    print(f"archive compact: {report}", file=sys.stderr)
    return 0


async def _count_to_rc(coro: Coroutine[Any, Any, int]) -> int:
    n = await coro
    print(f"backfilled {n} records", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
