"""`okx-ingest replay` as a user runs it: output formats over an archive, and every kind of bad input."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import websockets
from moto.server import ThreadedMotoServer

from ingest.core.archive_schema import Coordinates
from ingest.core.records import BookAction, BookUpdate, GapStatus, Record, Source, TopicKind, Trade
from ingest.io.broker import free_port
from tests.e2e.replay_support import Located, write_archive

T0 = 1_796_000_000_000
INSTS = ("BTC-USDT", "ETH-USDT")


def _trades() -> list[Located]:
    out: list[Located] = []
    for n in range(40):
        inst = INSTS[n % 2]
        t = Trade(channel="trades-all", inst_id=inst, ts=T0 + n * 10, recv_ts_ns=(T0 + n * 10) * 1_000_000 + 5,
                  source=Source.WS, record_id=f"ws:c:{n}", trade_id=str(1000 + n), px="100.50", sz="0.1",
                  side="buy" if n % 3 else "sell")
        out.append((t, Coordinates("okx.trades", n % 2, n // 2, t.ts)))
    return out


def _books() -> list[Located]:
    lv = ("99.5", "1", "0", "1")
    recs = [BookUpdate(channel="books", inst_id=INSTS[0], ts=T0, recv_ts_ns=T0 * 1_000_000, source=Source.WS,
                       record_id="ws:b:1", action=BookAction.SNAPSHOT, bids=(lv,), asks=(("100.5", "2", "0", "1"),),
                       seq_id=1, prev_seq_id=-1),
            BookUpdate(channel="books", inst_id=INSTS[0], ts=T0 + 150, recv_ts_ns=(T0 + 150) * 1_000_000,
                       source=Source.WS, record_id="ws:b:2", action=BookAction.UPDATE,
                       bids=(("99.6", "3", "0", "2"),), asks=(), seq_id=2, prev_seq_id=1)]
    return [(r, Coordinates("okx.books", 0, i, r.ts)) for i, r in enumerate(recs)]


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    write_archive(root, TopicKind.TRADES, _trades())
    write_archive(root, TopicKind.BOOKS, _books())
    return root


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ingest.cli", "replay", *args], capture_output=True, text=True,
                          timeout=120, check=False)


def _iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _w(*extra: str) -> list[str]:
    return ["--from", _iso(T0 - 1000), "--to", _iso(T0 + 1000), *extra]


def test_jsonl_lines_carry_type_channel_instid_ts_and_exact_canonical_decimals(archive: Path) -> None:
    proc = _run(*_w("--source", str(archive), "--channel", "trades-all", "--inst", "BTC-USDT"))
    assert proc.returncode == 0, proc.stderr
    lines = [orjson.loads(x) for x in proc.stdout.splitlines()]
    assert [x["tradeId"] for x in lines] == [str(1000 + n) for n in range(0, 40, 2)]
    first = lines[0]
    assert (first["type"], first["channel"], first["instId"], first["ts"]) == ("trade", "trades-all", "BTC-USDT", T0)
    assert (first["px"], first["sz"]) == ("100.5", "0.1")
    assert "replayed 20 items (0 gaps" in proc.stderr


def test_book_snapshot_lines_carry_levels_best_first_and_their_seqid(archive: Path) -> None:
    proc = _run(*_w("--source", str(archive), "--channel", "books", "--book-snapshots", "2:100"))
    assert proc.returncode == 0, proc.stderr
    snaps = [x for x in map(orjson.loads, proc.stdout.splitlines()) if x["type"] == "book_snapshot"]
    by_ts = {x["ts"]: x for x in snaps}
    assert by_ts[T0 + 100]["bids"] == [["99.5", "1"]] and by_ts[T0 + 100]["seqId"] == 1
    assert by_ts[T0 + 200]["bids"] == [["99.6", "3"], ["99.5", "1"]] and by_ts[T0 + 200]["asks"] == [["100.5", "2"]]
    assert by_ts[T0 + 900]["seqId"] == 2  # a quiet book still emits at every boundary


def test_csv_and_parquet_hold_the_same_flat_rows(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    p1 = _run(*_w("--source", str(archive), "--format", "csv"))
    p2 = _run(*_w("--source", str(archive), "--format", "parquet", "--out", str(out)))
    assert p1.returncode == 0 and p2.returncode == 0, p1.stderr + p2.stderr
    rows = list(csv.DictReader(io.StringIO(p1.stdout)))
    table = pq.read_table(out)
    assert len(rows) == table.num_rows == 40 + 3  # 40 trades, 2 levels of the snapshot, 1 of the update
    assert [r["px"] for r in rows] == table.column("px").to_pylist()
    assert {r["type"] for r in rows} == {"trade", "book_change"}


def test_from_after_to_is_an_error_naming_both(archive: Path) -> None:
    proc = _run("--from", _iso(T0 + 1000), "--to", _iso(T0), "--source", str(archive))
    assert proc.returncode == 2
    assert "--from" in proc.stderr and "--to" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("args", "needle"), [
    (("--channel", "bookz"), "unknown OKX channel"),
    (("--inst", "BTC-USTD"), "unknown instrument BTC-USTD"),
    (("--book-snapshots", "10"), "DEPTH:INTERVAL_MS"),
    (("--format", "hftbacktest"), "exactly one --inst"),
])
def test_bad_requests_exit_2_with_a_message_naming_what_to_fix(archive: Path, args: tuple[str, ...],
                                                               needle: str) -> None:
    proc = _run(*_w("--source", str(archive), *args))
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_unreachable_kafka_and_missing_archive_exit_2(tmp_path: Path) -> None:
    kafka = _run(*_w("--source", f"kafka://127.0.0.1:{free_port()}"))
    assert kafka.returncode == 2 and "unreachable" in kafka.stderr and "Traceback" not in kafka.stderr
    missing = _run(*_w("--source", str(tmp_path / "nowhere")))
    assert missing.returncode == 2 and "nowhere" in missing.stderr and "Traceback" not in missing.stderr


def test_a_window_without_data_says_so_and_exits_0(archive: Path) -> None:
    proc = _run("--from", _iso(T0 + 86_400_000), "--to", _iso(T0 + 90_000_000), "--source", str(archive))
    assert proc.returncode == 0 and proc.stdout == ""
    assert "no data" in proc.stderr


def test_an_output_inside_the_replayed_archive_is_refused(archive: Path) -> None:
    proc = _run(*_w("--source", str(archive), "--out", str(archive / "x.jsonl")))
    assert proc.returncode == 2 and "inside the archive" in proc.stderr
    assert not (archive / "x.jsonl").exists()


def test_a_corrupt_file_is_an_error_naming_it_unless_lenient_replays_around_it_as_a_gap(archive: Path) -> None:
    bad = sorted((archive / "trades").rglob("*.parquet"))[0]
    bad.write_bytes(b"PAR1 this is not parquet")
    proc = _run(*_w("--source", str(archive), "--channel", "trades-all"))
    assert proc.returncode == 2 and bad.name in proc.stderr and "--lenient" in proc.stderr
    lenient = _run(*_w("--source", str(archive), "--channel", "trades-all", "--lenient"))
    assert lenient.returncode == 0, lenient.stderr
    lines = [orjson.loads(x) for x in lenient.stdout.splitlines()]
    gaps = [x for x in lines if x["type"] == "gap"]
    assert len(gaps) == 1 and bad.name in gaps[0]["reason"] and gaps[0]["status"] == "unfillable"
    assert gaps[0]["instId"] in INSTS
    others = {x["instId"] for x in lines if x["type"] == "trade"}
    assert others and gaps[0]["instId"] not in others  # the other instrument's file replays in full
    assert bad.name in lenient.stderr


def test_a_file_its_manifest_names_but_the_store_lacks_is_an_error_unless_lenient(archive: Path) -> None:
    directory = next((archive / "trades").rglob("instId=ETH-USDT"))
    (directory / "_manifest.json").write_bytes(orjson.dumps({"files": [
        {"name": p.name} for p in directory.glob("*.parquet")] + [{"name": "okx.trades+1+00000000000000000100+"
                                                                           "00000000000000000200.parquet"}]}))
    proc = _run(*_w("--source", str(archive), "--channel", "trades-all"))
    assert proc.returncode == 2 and "okx.trades+1+00000000000000000100" in proc.stderr and "missing" in proc.stderr
    lenient = _run(*_w("--source", str(archive), "--channel", "trades-all", "--lenient"))
    assert lenient.returncode == 0, lenient.stderr
    lines = [orjson.loads(x) for x in lenient.stdout.splitlines()]
    (gap,) = [x for x in lines if x["type"] == "gap"]
    assert gap["instId"] == "ETH-USDT" and "missing" in gap["reason"]
    assert len([x for x in lines if x["type"] == "trade"]) == 40  # every file that is there replays


@pytest.fixture
def moto_s3() -> Iterator[tuple[str, dict[str, str]]]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing-" + os.urandom(4).hex(), "AWS_SECRET_ACCESS_KEY": os.urandom(12).hex(),
           "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        yield f"{host}:{port}", env
    finally:
        server.stop()


def test_an_s3_archive_replays_like_the_same_files_on_disk(archive: Path,
                                                          moto_s3: tuple[str, dict[str, str]]) -> None:
    endpoint, aws = moto_s3
    old = {k: os.environ.get(k) for k in aws}
    os.environ.update(aws)
    try:
        fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1",
                               allow_bucket_creation=True)
        fs.create_dir("replay-bucket")
        for path in archive.rglob("*.parquet"):
            with fs.open_output_stream(f"replay-bucket/okx/{path.relative_to(archive)}") as out:
                out.write(path.read_bytes())
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    env = {**os.environ, **aws, "OKX_INGEST__ARCHIVE__S3_ENDPOINT_OVERRIDE": f"http://{endpoint}",
           "OKX_INGEST__ARCHIVE__S3_REGION": "us-east-1"}
    s3 = subprocess.run([sys.executable, "-m", "ingest.cli", "replay", *_w("--source", "s3://replay-bucket/okx",
                                                                           "--book-snapshots", "2:100")],
                        capture_output=True, text=True, timeout=120, check=False, env=env)
    local = _run(*_w("--source", str(archive), "--book-snapshots", "2:100"))
    assert s3.returncode == 0, s3.stderr
    assert s3.stdout == local.stdout and s3.stdout.count("\n") > 40


async def test_replay_serve_from_the_cli_pushes_the_archive_and_stops_on_sigint(archive: Path) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingest.cli", "replay", "serve", "--port", str(port), *_w("--source", str(archive)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            banner = await proc.stdout.readline()
        assert b"replaying 42 items" in banner, banner  # 40 trades and 2 book records
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/v5/business") as ws:
            await ws.send(orjson.dumps({"op": "subscribe", "args": [{"channel": "trades-all",
                                                                     "instId": "ETH-USDT"}]}).decode())
            async with asyncio.timeout(10):
                assert orjson.loads(await ws.recv())["event"] == "subscribe"
                pushes = [orjson.loads(await ws.recv()) for _ in range(20)]
        assert [p["data"][0]["tradeId"] for p in pushes] == [str(1000 + n) for n in range(1, 40, 2)]
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            rc = await proc.wait()
    assert rc == 0


@pytest.mark.parametrize("view", ["repaired", "recorded"])
@pytest.mark.parametrize("filters", [{}, {"instruments": ["ETH-USDT"]}, {"channels": ["books"]}])
def test_archive_batches_from_columns_equal_the_rows_of_the_items(archive: Path, view: str,
                                                                  filters: dict[str, list[str]]) -> None:
    from ingest.replay import replay
    from ingest.replay._arrow import fast_batches
    from ingest.replay.formats import FLAT_SCHEMA, arrow_batches

    rp = replay(str(archive), T0 - 1000, T0 + 1000, view=view, **filters)  # type: ignore[arg-type]
    assert fast_batches(rp._reader.source, rp.kinds, rp.start, rp.end, rp.view, rp.instruments,  # type: ignore[attr-defined]
                        rp.channels, list, 10) is not None, "the columns path must be the one taken"
    fast = pa.Table.from_batches(list(rp.batches()), schema=FLAT_SCHEMA)
    slow = pa.Table.from_batches(list(arrow_batches(iter(rp))), schema=FLAT_SCHEMA)
    assert fast.num_rows > 0 and fast.equals(slow)


@pytest.mark.parametrize("view", ["repaired", "recorded"])
@pytest.mark.parametrize("stored_keys", [True, False])
def test_archive_batches_from_columns_keep_one_copy_of_an_event_two_replicas_recorded(
        tmp_path: Path, view: str, stored_keys: bool) -> None:
    """Two recordings of the same trades and book updates (another connection, so other recordIds) in one
    archive: both paths keep the first copy of each event, with or without a stored `eventKey`."""
    from ingest.core.identity import event_key
    from ingest.replay import replay
    from ingest.replay.formats import FLAT_SCHEMA, arrow_batches

    def copy(rec: Record, conn: str) -> Record:
        import msgspec

        assert isinstance(rec, Trade | BookUpdate)
        out = msgspec.structs.replace(rec, record_id=rec.record_id.replace("ws:", f"ws:{conn}"),
                                      recv_ts_ns=rec.recv_ts_ns + 1 if conn == "z" else rec.recv_ts_ns)
        return msgspec.structs.replace(out, event_key=event_key(out)) if stored_keys else out

    root = tmp_path / "archive"
    trades = [(copy(r, conn), Coordinates(c.topic, c.partition, c.offset * 2 + (conn == "z"), c.kafka_ts_ms))
              for r, c in _trades() for conn in ("a", "z")]
    books = [(copy(r, conn), Coordinates(c.topic, c.partition, c.offset * 2 + (conn == "z"), c.kafka_ts_ms))
             for r, c in _books() for conn in ("a", "z")]
    write_archive(root, TopicKind.TRADES, trades)
    write_archive(root, TopicKind.BOOKS, books)
    rp = replay(str(root), T0 - 1000, T0 + 1000, view=view)  # type: ignore[arg-type]
    fast = pa.Table.from_batches(list(rp.batches()), schema=FLAT_SCHEMA)
    slow = pa.Table.from_batches(list(arrow_batches(iter(rp))), schema=FLAT_SCHEMA)
    assert fast.equals(slow)
    trade_ids = [i for t, i in zip(fast.column("type").to_pylist(), fast.column("id").to_pylist(), strict=True)
                 if t == "trade"]
    assert trade_ids == [str(1000 + n) for n in range(40)]
    book_ids = {i for t, i in zip(fast.column("type").to_pylist(), fast.column("id").to_pylist(), strict=True)
                if t == "book_change"}
    assert book_ids == {"ws:ab:1", "ws:ab:2"}


#: (px, sz) below 1e-6, where Arrow's decimal text (and Python's str of a Decimal) switch to an exponent.
_TINY = [("0.00000001", "0.0000001"), ("0.000000123", "12345.00000001"), ("0.00000099", "0.000000000000000001"),
         ("100.5", "0.000001")]


def _tiny_archive(root: Path) -> None:
    trades: list[Located] = []
    for n, (px, sz) in enumerate(_TINY):
        t = Trade(channel="trades-all", inst_id=INSTS[0], ts=T0 + n * 10, recv_ts_ns=(T0 + n * 10) * 1_000_000 + 5,
                  source=Source.WS, record_id=f"ws:c:{n}", trade_id=str(1000 + n), px=px, sz=sz, side="buy")
        trades.append((t, Coordinates("okx.trades", 0, n, t.ts)))
    book = BookUpdate(channel="books", inst_id=INSTS[0], ts=T0 + 5, recv_ts_ns=(T0 + 5) * 1_000_000,
                      source=Source.WS, record_id="ws:b:1", action=BookAction.SNAPSHOT,
                      bids=(("0.00000001", "0.00000002", "0", "1"),), asks=(("0.00000003", "7", "0", "1"),),
                      seq_id=1, prev_seq_id=-1)
    write_archive(root, TopicKind.TRADES, trades)
    write_archive(root, TopicKind.BOOKS, [(book, Coordinates("okx.books", 0, 0, book.ts))])


def test_prices_and_sizes_below_a_millionth_come_out_plain_and_exact_in_batches_jsonl_and_csv(tmp_path: Path) -> None:
    """0.00000001 is a normal OKX size (1 satoshi); Arrow casts such a decimal to "1.0000000000E-8"."""
    from ingest.replay import replay
    from ingest.replay._arrow import fast_batches
    from ingest.replay.formats import FLAT_SCHEMA, arrow_batches

    root = tmp_path / "archive"
    _tiny_archive(root)
    want_trades = [list(x) for x in _TINY]
    want_levels = [["0.00000001", "0.00000002"], ["0.00000003", "7"]]

    rp = replay(str(root), T0 - 1000, T0 + 1000)
    assert fast_batches(rp._reader.source, rp.kinds, rp.start, rp.end, rp.view, rp.instruments,  # type: ignore[attr-defined]
                        rp.channels, list, 10) is not None, "the columns path must be the one taken"
    fast = pa.Table.from_batches(list(rp.batches()), schema=FLAT_SCHEMA)
    rows = [(t, [p, s]) for t, p, s in zip(fast.column("type").to_pylist(), fast.column("px").to_pylist(),
                                            fast.column("sz").to_pylist(), strict=True)]
    assert [ps for t, ps in rows if t == "trade"] == want_trades
    assert [ps for t, ps in rows if t == "book_change"] == want_levels
    assert fast.equals(pa.Table.from_batches(list(arrow_batches(iter(rp))), schema=FLAT_SCHEMA))

    jsonl = _run(*_w("--source", str(root)))
    assert jsonl.returncode == 0, jsonl.stderr
    lines = [orjson.loads(x) for x in jsonl.stdout.splitlines()]
    assert [[x["px"], x["sz"]] for x in lines if x["type"] == "trade"] == want_trades
    (book,) = [x for x in lines if x["type"] == "book_change"]
    assert [lv[:2] for lv in book["bids"] + book["asks"]] == want_levels
    snaps = _run(*_w("--source", str(root), "--channel", "books", "--book-snapshots", "1:500"))
    (snap,) = [x for x in map(orjson.loads, snaps.stdout.splitlines()) if x["type"] == "book_snapshot"]
    assert snap["bids"] + snap["asks"] == want_levels

    csv_out = _run(*_w("--source", str(root), "--format", "csv"))
    assert csv_out.returncode == 0, csv_out.stderr
    csv_rows = list(csv.DictReader(io.StringIO(csv_out.stdout)))
    assert [[r["px"], r["sz"]] for r in csv_rows if r["type"] == "trade"] == want_trades
    assert [[r["px"], r["sz"]] for r in csv_rows if r["type"] == "book_change"] == want_levels


def _stats_archive(root: Path, extras_late: bool) -> None:
    """Trades of both instruments (five recorded twice, by another connection), a book of two levels then one,
    an open gap, a filled one, one that opens before the window and ends inside it; with `extras_late`, a last
    trade with extra fields (the columns path leaves such a slice to the item path)."""
    import msgspec

    from tests.integration.test_backfill import trade_gap

    trades = _trades()
    twice = [(msgspec.structs.replace(r, record_id=f"ws:z:{r.trade_id}", recv_ts_ns=r.recv_ts_ns + 1),
              Coordinates(c.topic, c.partition, 100 + c.offset, c.kafka_ts_ms))
             for r, c in trades[10:15] if isinstance(r, Trade)]
    late: list[Located] = []
    if extras_late:
        t = Trade(channel="trades-all", inst_id=INSTS[0], ts=T0 + 900, recv_ts_ns=(T0 + 900) * 1_000_000,
                  source=Source.WS, record_id="ws:c:900", trade_id="1900", px="101", sz="1", side="buy",
                  extra={"venue": "x"})
        late.append((t, Coordinates("okx.trades", 0, 200, t.ts)))
    write_archive(root, TopicKind.TRADES, [*trades, *twice, *late])
    write_archive(root, TopicKind.BOOKS, _books())
    gaps = [trade_gap("open", INSTS[0], (1004, T0 + 40), (1006, T0 + 60)),
            msgspec.structs.replace(trade_gap("filled", INSTS[1], (1011, T0 + 110), (1013, T0 + 130)),
                                    status=GapStatus.FILLED, revision=1),
            trade_gap("before", INSTS[1], (900, T0 - 1500), (1001, T0 + 10))]
    write_archive(root, TopicKind.GAPS, [(g, Coordinates("okx.gaps", 0, i, T0)) for i, g in enumerate(gaps)])


@pytest.mark.parametrize("view", ["repaired", "recorded"])
@pytest.mark.parametrize(("slice_rows", "extras_late"), [(1_000_000, False), (7, False), (7, True)],
                         ids=["one slice", "slices", "slices then items"])
def test_batches_from_the_archive_report_the_same_stats_as_the_item_iterator(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, view: str, slice_rows: int, extras_late: bool) -> None:
    """`.stats` (the CLI's summary: items, gaps, time span) after `.batches()` equals what the iterator reports
    for the same window, whether the rows come from the columns (in one time slice or several), or partly from
    the item path (a slice the columns cannot give)."""
    import dataclasses

    from ingest.replay import _arrow, replay
    from ingest.replay._arrow import fast_batches

    root = tmp_path / "archive"
    _stats_archive(root, extras_late)
    monkeypatch.setattr(_arrow, "SLICE_TARGET_ROWS", slice_rows)
    rp = replay(str(root), T0 - 1000, T0 + 1000, view=view)  # type: ignore[arg-type]
    assert fast_batches(rp._reader.source, rp.kinds, rp.start, rp.end, rp.view, rp.instruments,  # type: ignore[attr-defined]
                        rp.channels, list, 10) is not None, "the columns path must be the one taken first"
    items = list(rp)
    by_items = dataclasses.asdict(rp.stats)
    gaps = 3 if view == "recorded" else 2
    assert (by_items["items"], by_items["gaps"]) == (40 + 2 + gaps + extras_late, gaps)  # duplicates left out
    assert by_items["first_ts"] == T0 - 1500 and by_items["last_ts"] == (T0 + 900 if extras_late else T0 + 390)
    assert len(items) == by_items["items"]

    only_batches = replay(str(root), T0 - 1000, T0 + 1000, view=view)  # type: ignore[arg-type]
    rows = sum(b.num_rows for b in only_batches.batches(batch_size=5))
    assert rows == 40 + 3 + gaps + extras_late  # a book record is a row per level
    assert dataclasses.asdict(only_batches.stats) == by_items
    rows = sum(b.num_rows for b in rp.batches(batch_size=5))  # after an iteration: its stats are replaced
    assert dataclasses.asdict(rp.stats) == by_items
