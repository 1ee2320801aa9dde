"""Entry point `okx-ingest`: run, demo, simulate, backfill, check, replay.

Imports are deferred to the chosen command so `okx-ingest --help` and the simulator start fast and a
broken optional part cannot stop an unrelated command.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.errors import ConfigError, IngestError

if TYPE_CHECKING:
    from ingest.config import Settings

if TYPE_CHECKING:
    from ingest.services.backfill import RangeResult


def _iso_ms(value: str) -> int:
    """Epoch ms of an ISO-8601 date/time (UTC when no zone is given)."""
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {value!r} (e.g. 2026-11-24T10:00:00Z)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _iso_date(value: str) -> str:
    """A UTC day as `YYYY-MM-DD` (the archive's `date=` partitions)."""
    try:
        if len(value) == 10:
            return datetime.strptime(value, "%Y-%m-%d").date().isoformat()
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"not a date: {value!r} (use YYYY-MM-DD, a UTC day, e.g. 2026-12-01)")


def _port(value: str) -> int:
    from ingest.sim.server import port_number

    return port_number(value)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="okx-ingest")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="record OKX streams into Kafka")
    run.add_argument("--config", type=Path, default=None, help="TOML settings file")

    demo = sub.add_parser("demo", help="try it offline: record from a built-in OKX simulator into a local broker")
    demo.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: until Ctrl-C)")
    demo.add_argument("--keep", action="store_true",
                      help="after the recording stops, keep the broker and its data up until Ctrl-C")

    sim = sub.add_parser("simulate", help="run the OKX simulator (WebSocket + REST on one port)")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=_port, default=8765)
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

    tail = sub.add_parser("tail", help="print the decoded records of topics (like kcat -C, with our schemas)")
    tail.add_argument("topics", nargs="+", metavar="TOPIC",
                      help="topic name, or a kind the topic prefix is added to (trades, books, gaps, dlq, ...)")
    tail.add_argument("--config", type=Path, default=None, help="TOML settings file (Kafka address and security)")
    tail.add_argument("--bootstrap", help="Kafka address, overriding the settings (e.g. the demo's 127.0.0.1:PORT)")
    tail.add_argument("--inst", help="only records of this instId, e.g. BTC-USDT")
    start = tail.add_mutually_exclusive_group()
    start.add_argument("--from", dest="from_ms", type=_iso_ms, metavar="ISO",
                       help="start at this time (ISO-8601, UTC when no zone), e.g. 2026-11-24T10:00:00Z")
    start.add_argument("--last", type=_positive_int, metavar="N", help="only the last N records (of all partitions)")
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new records until Ctrl-C")
    tail.add_argument("--format", choices=("table", "json"), default="table",
                      help="table (default) for reading, json for one object per line")

    ar = sub.add_parser("archive", help="archive every topic into partitioned Parquet (docs/ARCHIVE.md)")
    ar.add_argument("--config", type=Path, default=None)
    ar_sub = ar.add_subparsers(dest="archive_command", required=False)
    verify = ar_sub.add_parser("verify", help="re-read files against their manifests; non-zero on any problem")
    verify.add_argument("--config", type=Path, default=None, dest="sub_config")
    verify.add_argument("--date", default=None, type=_iso_date, help="YYYY-MM-DD (default: every date)")
    compact = ar_sub.add_parser("compact", help="merge each partition's small files of one date")
    compact.add_argument("--config", type=Path, default=None, dest="sub_config")
    compact.add_argument("--date", required=True, type=_iso_date,
                         help="YYYY-MM-DD, a UTC day that is over (today's is still being written)")

    from ingest.replay_cli import add_arguments as replay_arguments

    replay_arguments(sub.add_parser("replay", help="replay a window from Kafka or the archive (docs/REPLAY.md)"))
    _user_help(p)
    return p


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {n}")
    return n


DESCRIPTION = """Record OKX market data and your account's streams into Kafka as validated Avro records,
and fill every gap from OKX's REST API.

Start with `okx-ingest demo` (no account or Kafka needed), look at what it recorded with
`okx-ingest tail`, then point a config file at your Kafka and run `okx-ingest check` and `okx-ingest run`.
Credentials come from the environment (OKX_API_KEY, OKX_API_SECRET, OKX_API_PASSPHRASE, or *_FILE)."""

#: One or more examples per subcommand, shown at the end of its --help.
EXAMPLES = {
    None: """examples:
  okx-ingest demo                                  try everything offline
  okx-ingest check --config okx-ingest.toml        validate settings, credentials and Kafka
  okx-ingest run --config okx-ingest.toml          record
  okx-ingest tail trades --inst BTC-USDT --last 20  look at the data
run `okx-ingest COMMAND --help` for a command's options.""",
    "run": """example:
  OKX_API_KEY_FILE=/run/secrets/okx_key ... okx-ingest run --config /etc/okx-ingest/okx-ingest.toml""",
    "demo": """examples:
  okx-ingest demo                    record from the built-in simulator until Ctrl-C
  okx-ingest demo --seconds 30 --keep  record 30 s, then keep the broker up to look at the data""",
    "simulate": """example:
  okx-ingest simulate --port 8765    then set okx.ws_base_url = "ws://127.0.0.1:8765" and
                                     okx.rest_base_url = "http://127.0.0.1:8765" in a config""",
    "backfill": """examples:
  okx-ingest backfill --config okx-ingest.toml      fill the gaps the recorder reports, until stopped
  okx-ingest backfill --config okx-ingest.toml --channel trades --inst BTC-USDT \\
      --since 2026-11-24T10:00:00Z --until 2026-11-24T11:00:00Z
with --channel, the exit code says how the range ended: 0 filled, 3 partial, 4 unfillable,
1 not finished (Kafka unreachable, or OKX kept failing: run it again), 2 a usage or settings error.""",
    "check": """example:
  okx-ingest check --config okx-ingest.toml   exit code 0 when everything is ready to record""",
    "tail": """examples:
  okx-ingest tail trades --inst BTC-USDT --last 20
  okx-ingest tail okx.gaps okx.dlq --from 2026-11-24T10:00:00Z
  okx-ingest tail books --follow --format json --config okx-ingest.toml | jq .value.seqId
  okx-ingest tail trades --bootstrap 127.0.0.1:39092 --follow      (the address `demo` prints)""",
    "archive": """examples:
  okx-ingest archive --config okx-ingest.toml              (every topic into archive.url, until SIGTERM)
  okx-ingest archive verify --date 2026-11-24 --config okx-ingest.toml
  okx-ingest archive compact --date 2026-11-24 --config okx-ingest.toml""",
    "replay": """examples:
  okx-ingest replay --from 2026-11-24T10:00:00Z --to 2026-11-24T11:00:00Z --source var/archive --inst BTC-USDT
  okx-ingest replay --from 2026-11-24T10:00Z --to 2026-11-24T10:05Z --book-snapshots 10:1000 --out books.jsonl
  okx-ingest replay --from 2026-11-24T10:00Z --to 2026-11-25T00:00Z --format hftbacktest --out btc.npz
  okx-ingest replay serve --port 8765 --from 2026-11-24T10:00Z --to 2026-11-24T11:00Z --speed 10""",
    "archive verify": """example:
  okx-ingest archive verify --config okx-ingest.toml --date 2026-11-24
exit code 0 when every file matches its manifest, 1 on any missing, corrupt, unlisted or overlapping file.""",
    "archive compact": """example:
  okx-ingest archive compact --config okx-ingest.toml --date 2026-11-24
merges each partition's files below archive.compact_min_bytes; safe to run again or after an interruption.""",
}


def _user_help(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """Put the user-facing description and the examples on the parser and each (nested) subcommand, whose
    examples are keyed by its full name (`archive verify`)."""
    if not prefix:
        parser.description = DESCRIPTION
        parser.epilog = EXAMPLES[None]
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                sub.epilog = EXAMPLES.get(prefix + name)
                sub.formatter_class = argparse.RawDescriptionHelpFormatter
                if sub.description is None:
                    sub.description = next((c.help for c in action._choices_actions if c.dest == name), None)
                _user_help(sub, f"{prefix}{name} ")


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

            return _run(run_demo(seconds=args.seconds, keep=args.keep))
        settings = load_settings(getattr(args, "sub_config", None) or args.config)
        if args.command == "archive":
            return _archive(args, settings)
        if args.command == "run":
            from ingest.config import require_subscriptions
            from ingest.supervisor import run_daemon

            require_subscriptions(settings)
            require_writable_dir(settings.journal.dir, "journal.dir")
            require_free_port(settings.obs.metrics_host, settings.obs.metrics_port, "obs.metrics_port")
            offline = unresolvable_host(settings)
            if offline is not None:
                print(f"okx-ingest: cannot resolve {offline}: offline? `make demo` (okx-ingest demo) runs without "
                      "network", file=sys.stderr)
                return 1  # not a configuration error: a supervisor restarts it until the network is back
            return _run(run_daemon(settings))
        if args.command == "check":
            from ingest.check import check

            return _run(check(settings, offline=args.offline))
        if args.command == "backfill":
            from ingest.services.backfill import backfill_range, run_worker

            if args.channel:
                missing = [n for n in ("inst", "since", "until") if getattr(args, n) is None]
                if missing:
                    print(f"okx-ingest: backfill --channel needs --{', --'.join(missing)} (e.g. --channel trades "
                          "--inst BTC-USDT --since 2026-11-24T10:00:00Z --until 2026-11-24T11:00:00Z)",
                          file=sys.stderr)
                    return 2
                return _run(_range_rc(backfill_range(settings, args.channel, args.inst, args.since,
                                                     args.until, sys.stderr.isatty())))
            require_writable_dir(settings.backfill.journal_dir or settings.journal.dir,
                                 "backfill.journal_dir" if settings.backfill.journal_dir else "journal.dir")
            require_free_port(settings.obs.metrics_host, settings.backfill.metrics_port, "backfill.metrics_port")
            return _run(run_worker(settings))
        if args.command == "tail":
            return _run(_tail(settings, args))
        if args.command == "replay":
            from ingest.replay_cli import run as run_replay

            return run_replay(args, settings)
    except IngestError as exc:
        print(f"okx-ingest: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


async def _tail(settings: Any, args: argparse.Namespace) -> int:
    """`tail` until the end (or Ctrl-C with --follow); exit code 0, also when nothing matched."""
    import signal

    from ingest.tail import tail

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await tail(settings, args.topics, out=sys.stdout, inst=args.inst, from_ms=args.from_ms, last=args.last,
               follow=args.follow, fmt=args.format, bootstrap=args.bootstrap, stop=stop)
    return 0


def _archive(args: argparse.Namespace, settings: Any) -> int:
    """`okx-ingest archive [verify|compact]`."""
    if args.archive_command is None:
        from ingest.services.archive import run_archiver

        return _run(run_archiver(settings))
    from ingest.services.archive import open_store
    from ingest.services.archive_tools import LiveDateError, compact, verify_report

    store = open_store(settings.archive, write=args.archive_command != "verify")
    where = f"{store.url}" + (f" for {args.date}" if args.date else "")
    if args.archive_command == "verify":
        result = verify_report(store, date=args.date)
        for p in result.problems:
            print(p, file=sys.stderr)
        print(f"archive verify: {result.summary()} in {where}", file=sys.stderr)
        return 1 if result.problems else 0
    try:
        report = compact(store, date=args.date, min_bytes=settings.archive.compact_min_bytes,
                         target_bytes=settings.archive.compact_target_bytes)
    except LiveDateError as exc:
        print(f"okx-ingest archive compact: --date {exc}", file=sys.stderr)
        return 2
    print("archive compact: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in report.items())
          + f" in {where}", file=sys.stderr)
    return 0


def require_writable_dir(path: Path, key: str) -> None:
    """Create `path` and prove it takes a file now, so a journal under a file or on a read-only mount is a
    configuration error at start-up rather than a crash of the delivery task later."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A name of its own: replicas started together on one host share journal.dir, and one fixed probe name
        # let one unlink the other's probe (ENOENT) and refuse to start.
        fd, probe = tempfile.mkstemp(prefix=".okx-ingest-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(key, f"{str(path)!r} is not a writable directory ({exc.strerror or exc})",
                          "point it at a directory this user can write (not under a file, not read-only)") from None


def unresolvable_host(settings: Settings) -> str | None:
    """The first OKX host of these settings that does not resolve (no network, no DNS), else None: one line
    then says what is wrong instead of a reconnect loop logging the same failure for ever."""
    import socket
    from urllib.parse import urlsplit

    from ingest.okx.endpoints import REST_BASE
    from ingest.services.connections import endpoint_url
    from ingest.supervisor import wanted_args

    endpoints = sorted({a.endpoint for a in wanted_args(settings) if a.endpoint is not None})
    urls = [endpoint_url(settings.okx, settings.ws, e) for e in endpoints] + [settings.okx.rest_base_url or REST_BASE]
    for host in dict.fromkeys(h for h in (urlsplit(u).hostname for u in urls) if h):  # WebSocket hosts first
        try:
            socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
        except socket.gaierror:
            return host
    return None


def require_free_port(host: str, port: int, key: str) -> None:
    """Fail in one line before anything starts when the health server could not listen (the server itself
    reports the same as a ConfigError should the port be taken in between)."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ConfigError("obs.metrics_host", f"{host!r} does not resolve ({exc.strerror or exc})",
                          "use an address of this host (127.0.0.1, 0.0.0.0, the pod IP)") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no clash
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(key, f"port {port} on {host} is in use",
                                  "stop what listens there or choose another port (0 picks a free one)") from None
            raise ConfigError("obs.metrics_host", f"cannot listen on {host}:{port} ({exc.strerror or exc})",
                              "use an address of this host (127.0.0.1, 0.0.0.0, the pod IP)") from None


async def _range_rc(coro: Coroutine[Any, Any, RangeResult]) -> int:
    """The range's exit code: 0 filled, 3 partial, 4 unfillable, 1 not finished (see RangeResult)."""
    return (await coro).exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
