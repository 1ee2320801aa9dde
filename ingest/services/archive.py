"""The archive service: every record topic into partitioned Parquet files, exactly once (docs/ARCHIVE.md).

Exactly once without a transaction log:
- A file holds the records of one Kafka partition for one (dataset, date, instId) directory, and is named by
  that partition and its first and last offset. Per (directory, partition) at most one file is open, and
  files of one (directory, partition) are written in offset order, so "the largest last offset among that
  directory's files of this partition" says exactly which of its records are already archived.
- Offsets are committed only up to the first record not yet in a durable file. After a crash the archiver
  re-reads from there; when it first meets a (directory, partition) it lists the directory and skips every
  record at or below that largest last offset, so a record is never written twice, whatever moment the
  crash hit and however file boundaries fall this time.
- Files appear whole or not at all (io/archive_store.py).
Memory: all open files share one capped budget (`archive.max_buffer_bytes`); past it the largest is written
first, so 1,000 instruments cost no more than 10.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import orjson
import pyarrow as pa
import pyarrow.compute as pc
from aiokafka import AIOKafkaConsumer
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata, TopicPartition

from ingest import __version__
from ingest.config import ArchiveSettings, Settings
from ingest.core.archive_schema import (
    NO_INST_ID,
    RECORD_TYPE_BY_KIND,
    SCHEMA_VERSION,
    Converted,
    Coordinates,
    PartitionKey,
    Rejected,
    columnar,
    convert,
    convert_columns,
    file_name,
    parse_file_name,
    partition_key,
    partition_key_of,
)
from ingest.core.avro import CONFLUENT_MAGIC, SINGLE_OBJECT_MAGIC, DecodeError, Decoder, default_schemas
from ingest.core.avro_batch import BatchDecoder
from ingest.core.backoff import full_jitter
from ingest.core.records import (
    STRUCT_BY_AVRO_NAME,
    BookUpdate,
    GapEvent,
    RawFrames,
    Record,
    TopicKind,
    Trade,
    topic_name,
)
from ingest.errors import IngestError
from ingest.io.archive_store import ArchiveStore, WrittenFile
from ingest.io.kafka_security import kafka_client_kwargs
from ingest.io.readback import bootstrap_of
from ingest.obs.health import HealthServer, Readiness
from ingest.obs.metrics import counter, gauge, new_component_registry
from ingest.runtime import EXIT_CONFIG, EXIT_OK, EXIT_TASK_DIED, Runtime, finish_task

log = logging.getLogger("ingest.archive")
_T = TypeVar("_T")

REJECTED = "_rejected"
MANIFEST = "_manifest.json"
_REJECTED_SCHEMA = pa.schema([
    pa.field("reason", pa.string(), nullable=False), pa.field("field", pa.string()),
    pa.field("_topic", pa.string(), nullable=False), pa.field("_partition", pa.int32(), nullable=False),
    pa.field("_offset", pa.int64(), nullable=False), pa.field("_kafka_ts", pa.timestamp("ms", tz="UTC"),
                                                               nullable=False),
    pa.field("key", pa.binary()), pa.field("value", pa.binary()),
], metadata={b"okx.archive.kind": REJECTED.encode(), b"okx.archive.version": str(SCHEMA_VERSION).encode()})
#: The memory a buffered record costs, estimated from its Avro bytes: the decoded Struct holds every value
#: as a Python object (a 142-byte trade is ~1.3 kB with its coordinates; a book level of ~16 Avro bytes, a
#: tuple of four strings, ~190 B), so per Avro byte about 11x, plus a fixed part. Raw frames keep their
#: payload as bytes (about 1x). tests/integration/test_archive_buffers.py measures the real objects.
RECORD_EXPANSION = 12
RAW_EXPANSION = 2
RECORD_OVERHEAD = 400
#: How long the Kafka consumer gets to leave its group cleanly on a stop.
_CONSUMER_STOP_S = 10.0


class _Reject(NamedTuple):
    reason: str
    field: str | None
    key: bytes | None
    value: bytes | None


class _Bulk:
    """A record of a flat dataset decoded with its batch (core/avro_batch.py), kept as its value: what the archive
    needs of it before its file is written (its directory, rotation, lag and manifest entry); the file is built
    from the values again, in one batch (`Archiver._write`)."""

    __slots__ = ("dataset", "inst_id", "kind", "recv_ts_ns", "seq_id", "trade_id", "ts", "value")

    def __init__(self, kind: TopicKind, value: bytes, ts: int | None, inst_id: str | None, recv_ts_ns: int | None,
                 seq_id: int | None, trade_id: str | None) -> None:
        self.kind, self.dataset, self.value, self.ts, self.inst_id = kind, kind.value, value, ts, inst_id
        self.recv_ts_ns, self.seq_id, self.trade_id = recv_ts_ns, seq_id, trade_id


def _bulk_decoders() -> dict[bytes, tuple[BatchDecoder, TopicKind]]:
    """The batch decoder of each current schema of a flat dataset, by its single-object fingerprint."""
    out: dict[bytes, tuple[BatchDecoder, TopicKind]] = {}
    kinds = {cls: kind for kind, cls in RECORD_TYPE_BY_KIND.items()}
    for schema in default_schemas():
        cls = STRUCT_BY_AVRO_NAME.get(schema.name)
        kind = kinds.get(cls) if isinstance(cls, type) and issubclass(cls, Record) else None
        if kind is None or not columnar(kind):
            continue
        decoder = BatchDecoder.of(schema)
        if decoder is not None:
            out[schema.fingerprint] = (decoder, kind)
    return out


def _pylist(table: pa.Table, name: str) -> list[Any]:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


class _Buf:
    """One open file: the records of one Kafka partition for one directory."""

    __slots__ = ("avro_bytes", "bucket", "coords", "entered_ms", "items", "key", "last_seen", "last_ts", "nbytes",
                 "opened", "tp")

    def __init__(self, key: PartitionKey, tp: TopicPartition, bucket: int, now: float) -> None:
        self.key = key
        self.tp = tp
        self.bucket = bucket
        self.items: list[Record | _Bulk | _Reject] = []
        self.coords: list[Coordinates] = []
        self.nbytes = 0  # estimated memory of its records (what the shared budget counts)
        self.avro_bytes = 0  # their Avro size (what `archive.max_file_bytes` counts)
        self.opened = now
        self.last_seen = now
        self.last_ts = 0  # Kafka timestamp (ms) of its last record: the record time idle closing goes by
        self.entered_ms = 0  # when its first record entered the system (receive time), for the lag


@dataclass
class ArchiveStats:
    """What the archiver did, for metrics, readiness and tests."""

    records_in: int = 0
    records_written: int = 0
    records_skipped: int = 0
    records_rejected: int = 0
    #: Records whose file was built in one batch from their values (core/avro_batch.py), not record by record.
    records_bulk: int = 0
    files_written: int = 0
    bytes_written: int = 0
    buffered_bytes: int = 0
    peak_buffered_bytes: int = 0
    open_files: int = 0
    store_failures: int = 0
    store_error: str | None = None
    store_down_since: float | None = None
    last_commit: dict[str, int] = field(default_factory=dict)
    partitions: int = 0
    lag_s: float = 0.0


def dataset_of_channel(channel: str) -> str | None:
    """The dataset a gap's channel is recorded in (for the gaps list of that dataset's manifests)."""
    if channel.startswith(("books", "bbo")):
        return TopicKind.BOOKS.value
    if channel.startswith("candle") or "-candle" in channel:
        return TopicKind.CANDLES.value
    return {"trades": "trades", "trades-all": "trades", "tickers": "tickers", "mark-price": "mark_prices",
            "index-tickers": "index_tickers", "funding-rate": "funding_rates", "open-interest": "open_interest",
            "liquidation-orders": "liquidations", "price-limit": "price_limits", "instruments": "instruments",
            "orders": "orders", "fills": "fills", "positions": "positions", "account": "balances",
            "orders-algo": "algo_orders"}.get(channel)


def _stats_of(items: list[Record | _Bulk | _Reject]) -> dict[str, Any]:
    """first/last exchange time, seqId and tradeId of a file's records, for its manifest entry."""
    out: dict[str, Any] = {}
    ts = [t for r in items if isinstance(t := getattr(r, "ts", None), int)]
    if ts:
        out["firstTs"], out["lastTs"] = min(ts), max(ts)
    seq = [r.seq_id for r in items if (isinstance(r, BookUpdate | Trade) or (
        isinstance(r, _Bulk) and r.kind is TopicKind.TRADES)) and r.seq_id is not None]
    if seq:
        out["firstSeqId"], out["lastSeqId"] = seq[0], seq[-1]
    trade_ids = [r.trade_id for r in items if isinstance(r, Trade) or (
        isinstance(r, _Bulk) and r.kind is TopicKind.TRADES)]
    if trade_ids:
        out["firstTradeId"], out["lastTradeId"] = trade_ids[0], trade_ids[-1]
    return out


def _table_stats(kind: TopicKind, table: pa.Table) -> dict[str, Any]:
    """`_stats_of` from a file's table built in bulk (its rows are its records, in offset order)."""
    out: dict[str, Any] = {}
    if not table.num_rows:
        return out
    if "ts" in table.column_names:
        ts = table.column("ts").cast(pa.int64())
        if ts.null_count < len(ts):
            lo, hi = pc.min_max(ts).values()
            out["firstTs"], out["lastTs"] = lo.as_py(), hi.as_py()
    if kind is TopicKind.TRADES:
        seq = table.column("seqId").drop_null()
        if len(seq):
            out["firstSeqId"], out["lastSeqId"] = seq[0].as_py(), seq[-1].as_py()
        tid = table.column("tradeId")
        out["firstTradeId"], out["lastTradeId"] = tid[0].as_py(), tid[-1].as_py()
    return out


class Manifests:
    """The `_manifest.json` of each directory, rewritten atomically after each file.

    Every update re-reads the manifest from the store (under the date's lock, held by the caller), never a
    copy kept in memory: `archive compact` may have rewritten it since."""

    def __init__(self, store: ArchiveStore) -> None:
        self.store = store

    def load(self, key: PartitionKey) -> dict[str, Any]:
        raw = self.store.read_bytes(f"{key.path()}/{MANIFEST}")
        doc: dict[str, Any] = orjson.loads(raw) if raw else {
            "dataset": key.dataset, "date": key.date, "instId": key.inst_id, "schemaVersion": SCHEMA_VERSION,
            "files": [], "gaps": []}
        return doc

    def add_file(self, key: PartitionKey, written: WrittenFile, extra: dict[str, Any]) -> None:
        doc = self.load(key)
        files = [f for f in doc["files"] if f["name"] != written.name]
        files.append({"name": written.name, "rows": written.rows, "bytes": written.bytes, "sha256": written.sha256,
                      **extra})
        files.sort(key=lambda f: f["name"])
        doc["files"] = files
        doc["schemaVersion"] = max(int(doc.get("schemaVersion", 0)), SCHEMA_VERSION)
        self._save(key, doc)

    def remove_files(self, key: PartitionKey, names: Iterable[str]) -> None:
        doc = self.load(key)
        gone = set(names)
        doc["files"] = [f for f in doc["files"] if f["name"] not in gone]
        self._save(key, doc)

    def note_gap(self, key: PartitionKey, gap: GapEvent) -> None:
        doc = self.load(key)
        gaps = {g["gapId"]: g for g in doc.get("gaps", [])}
        old = gaps.get(gap.gap_id)
        if old is not None and old["revision"] > gap.revision:
            return
        gaps[gap.gap_id] = {"gapId": gap.gap_id, "revision": gap.revision, "channel": gap.channel,
                            "kind": gap.kind.value, "status": gap.status.value, "reason": gap.reason,
                            "before": None if gap.before is None else {"ts": gap.before.ts, "tradeId":
                                                                       gap.before.trade_id, "seqId": gap.before.seq_id},
                            "after": None if gap.after is None else {"ts": gap.after.ts, "tradeId":
                                                                     gap.after.trade_id, "seqId": gap.after.seq_id}}
        doc["gaps"] = sorted(gaps.values(), key=lambda g: g["gapId"])
        self._save(key, doc)

    def _save(self, key: PartitionKey, doc: dict[str, Any]) -> None:
        self.store.write_atomic(self.store.path(f"{key.path()}/{MANIFEST}"), manifest_bytes(doc))


def manifest_bytes(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, archiver: Archiver) -> None:
        self._archiver = archiver

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._archiver.drop_partitions(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._archiver.drop_partitions(assigned)  # what another member wrote meanwhile is read from the store


class Archiver:
    """One member of the archive consumer group: `run(stop)` until `stop` is set."""

    def __init__(self, settings: Settings, store: ArchiveStore, *, bootstrap_servers: str | None = None,
                 clock: Any = time.monotonic, incarnation: str | None = None) -> None:
        """`incarnation` names a broker whose offsets start again at 0 (the embedded one, at every start):
        it goes into file names (`okx.trades~<incarnation>+0+...`), so a new broker's offsets never meet
        an old broker's files."""
        self.settings = settings
        self.cfg: ArchiveSettings = settings.archive
        self.store = store
        self.bootstrap = bootstrap_servers or bootstrap_of(settings.kafka)
        self.topics = [topic_name(settings.kafka.topic_prefix, k) for k in TopicKind]
        self.stats = ArchiveStats()
        self.manifests = Manifests(store)
        self._clock = clock
        self._bufs: dict[tuple[PartitionKey, TopicPartition], _Buf] = {}
        self._durable: dict[tuple[PartitionKey, TopicPartition], int] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        #: The latest Kafka timestamp seen per partition: a file whose instrument has had no record for
        #: `idle_close_s` of this record time closes, even while a backlog is consumed faster than real time.
        self._tp_ts: dict[TopicPartition, int] = {}
        self._last_entered_ms: dict[TopicPartition, int] = {}  # of the last record consumed, for the lag
        self._consumer: AIOKafkaConsumer | None = None
        self._backoff = full_jitter(self.cfg.retry_initial_s, self.cfg.retry_max_s)
        self._retry_at = 0.0
        self.started = asyncio.Event()
        self._suffix = f"~{incarnation}" if incarnation else ""
        self._decoder = Decoder()
        self._bulk_decoders = _bulk_decoders()
        self._keys: dict[tuple[str, int, str | None], PartitionKey] = {}

    def _name_topic(self, tp: TopicPartition) -> str:
        return f"{tp.topic}{self._suffix}"

    # ---- the loop -----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        kafka = self.settings.kafka
        consumer = AIOKafkaConsumer(
            **kafka_client_kwargs(kafka, bootstrap_servers=self.bootstrap, client_id=f"{kafka.client_id}-archive"),
            group_id=self.cfg.group_id, enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=self.cfg.session_timeout_ms,
            max_poll_interval_ms=self.cfg.max_poll_interval_ms, metadata_max_age_ms=5_000,
            # A member that vanished (SIGKILL, a restarted broker) must not hold a join for minutes.
            rebalance_timeout_ms=self.cfg.session_timeout_ms)
        starting = asyncio.ensure_future(consumer.start())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not starting.done():  # asked to stop before Kafka answered
            starting.cancel()
            with contextlib.suppress(BaseException):
                async with asyncio.timeout(_CONSUMER_STOP_S):
                    await consumer.stop()
            return
        starting.result()
        self._consumer = consumer
        try:
            consumer.subscribe(pattern=_topics_pattern(self.topics), listener=_Rebalance(self))
            log.info("archive_started", extra={"group": self.cfg.group_id, "url": self.store.url,
                                               "version": __version__})
            self.started.set()
            while not stop.is_set():
                paused = self.stats.buffered_bytes >= self.cfg.max_buffer_bytes
                batch = {} if paused else await consumer.getmany(timeout_ms=500,
                                                                   max_records=self.cfg.poll_max_records)
                if paused:
                    await _wait(stop, 0.2)  # the store is down and the budget is full: wait for the retry
                for tp, msgs in batch.items():
                    await self._take(tp, msgs)
                await self._flush_due(final=False)
                await self._commit()
                self.stats.partitions = len(consumer.assignment())
            await self._drain()
        finally:
            self._consumer = None
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_CONSUMER_STOP_S):
                    await consumer.stop()

    async def _drain(self) -> None:
        """Write and commit what is buffered, within `archive.drain_timeout_s` (the rest is redone later)."""
        try:
            async with asyncio.timeout(self.cfg.drain_timeout_s):
                while self._bufs:
                    await self._flush_due(final=True)
                    await self._commit()
                    if self._bufs:
                        await asyncio.sleep(max(0.0, self._retry_at - self._clock()))
        except TimeoutError:
            log.error("archive_drain_timeout", extra={"open_files": len(self._bufs),
                                                      "note": "not committed: the next start archives them"})

    # ---- taking records -----------------------------------------------------------------------------

    async def _take(self, tp: TopicPartition, msgs: list[ConsumerRecord]) -> None:
        """Decode and buffer one partition's fetched records. The common case (the record goes into the open
        file of its slot, same bucket) is inline; opening, rotating, skipping and flushing go through `_add`."""
        now = self._clock()
        decoder = self._decoder
        rotate_ms = self.cfg.rotate_s * 1000
        max_file = self.cfg.max_file_bytes
        bufs = self._bufs
        nxt = self._next
        stats = self.stats
        stats.records_in += len(msgs)
        bulk = self._bulk(msgs)
        keys = self._keys
        for i, msg in enumerate(msgs):
            coord = Coordinates(msg.topic, msg.partition, msg.offset, msg.timestamp)
            value: bytes | None = msg.value
            item: Record | _Bulk | _Reject
            try:
                if value is None:
                    raise DecodeError("a record without a value")
                b = bulk[i] if bulk is not None else None
                if b is not None:
                    item, ts = b, b.ts
                    slot_of = (b.dataset, (ts if ts is not None else msg.timestamp) // 3_600_000, b.inst_id)
                    key = keys.get(slot_of) or self._key_of(slot_of, ts, msg.timestamp)
                else:
                    # Only Confluent framing needs the header; single-object values name their schema themselves.
                    schema = _schema_header(msg.headers) if value[:1] == CONFLUENT_MAGIC else None
                    item = decoder.decode(value, schema_name=schema)
                    key = partition_key(item, msg.timestamp)
                    ts = getattr(item, "ts", None)  # no exchange time (None too): by the Kafka time, as its date
                bucket = (ts if isinstance(ts, int) else msg.timestamp) // rotate_ms
            except (IngestError, ValueError, UnicodeDecodeError) as exc:
                item = _Reject(f"undecodable: {exc}", None, msg.key, value)
                key, bucket = self._rejected_key(msg.timestamp), 0
            avro_size = len(value or b"")
            buf = bufs.get((key, tp))
            if buf is not None and buf.bucket == bucket:  # the open file of its slot: nothing else to decide
                buf.items.append(item)
                buf.coords.append(coord)
                size = avro_size * (RAW_EXPANSION if isinstance(item, RawFrames) else RECORD_EXPANSION) \
                    + RECORD_OVERHEAD
                buf.nbytes += size
                buf.avro_bytes += avro_size
                buf.last_seen = now
                buf.last_ts = coord.kafka_ts_ms
                if coord.kafka_ts_ms > self._tp_ts.get(tp, 0):
                    self._tp_ts[tp] = coord.kafka_ts_ms
                stats.buffered_bytes += size
                if stats.buffered_bytes > stats.peak_buffered_bytes:
                    stats.peak_buffered_bytes = stats.buffered_bytes
                if buf.avro_bytes >= max_file:
                    await self._flush_due(final=False, only=[(key, tp)])
                elif stats.buffered_bytes >= self.cfg.max_buffer_bytes:
                    await self._flush_due(final=False, only=self._largest())
            else:
                await self._add(key, tp, bucket, item, coord, avro_size, now)
            nxt[tp] = msg.offset + 1
        if msgs:
            self._last_entered_ms[tp] = _entered_ms(item, coord)

    def _key_of(self, slot: tuple[str, int, str | None], ts: int | None, kafka_ts_ms: int) -> PartitionKey:
        """The directory of a bulk record, cached by (dataset, hour, instrument): its date is its hour's."""
        if len(self._keys) >= 100_000:
            self._keys.clear()
        key = self._keys[slot] = partition_key_of(slot[0], ts, slot[2], kafka_ts_ms)
        return key

    def _bulk(self, msgs: list[ConsumerRecord]) -> list[_Bulk | None] | None:
        """The records of flat datasets among `msgs` decoded a batch per schema (None where a value is left to
        the record path: too few of its schema, or a batch the batch decoder could not vouch for)."""
        if len(msgs) < BatchDecoder.MIN_BATCH or not self._bulk_decoders:
            return None
        groups: dict[bytes, list[int]] = {}
        decoders = self._bulk_decoders
        for i, m in enumerate(msgs):
            v = m.value
            if v is not None and v[:2] == SINGLE_OBJECT_MAGIC and (fp := v[2:10]) in decoders:
                groups.setdefault(fp, []).append(i)
        out: list[_Bulk | None] | None = None
        for fp, idx in groups.items():
            if len(idx) < BatchDecoder.MIN_BATCH:
                continue
            batch, kind = decoders[fp]
            values = [msgs[i].value for i in idx]
            table = batch.decode(values)
            if table is None:
                continue
            ts, inst, recv = _pylist(table, "ts"), _pylist(table, "instId"), _pylist(table, "recvTsNs")
            seq, tid = _pylist(table, "seqId"), _pylist(table, "tradeId")
            if out is None:
                out = [None] * len(msgs)
            for j, i in enumerate(idx):
                out[i] = _Bulk(kind, values[j], ts[j], inst[j], recv[j], seq[j], tid[j])
        return out

    def _convert(self, kind: TopicKind, items: list[Record | _Bulk | _Reject], coords: list[Coordinates]
                 ) -> tuple[Converted, bool]:
        """The file's table: in one batch from the values when every record came in bulk (the same table as
        `convert` makes), else record by record (bulk ones decoded on the way), with its rejections; and
        whether it was built in bulk."""
        if items and all(isinstance(r, _Bulk) for r in items):
            values = [r.value for r in items if isinstance(r, _Bulk)]
            entry = self._bulk_decoders.get(values[0][2:10])
            decoded = entry[0].decode(values) if entry is not None else None
            table = convert_columns(kind, decoded, coords) if decoded is not None else None
            if table is not None:
                self.stats.records_bulk += len(values)
                return Converted(table, []), True
        records: list[Record] = []
        at: list[int] = []  # each record's index in `items` (and `coords`)
        undecodable: list[Rejected] = []
        for i, r in enumerate(items):
            if isinstance(r, _Reject):
                continue
            if isinstance(r, _Bulk):
                try:
                    r = self._decoder.decode(r.value)
                except IngestError as exc:  # read in bulk, refused one by one: kept in _rejected, never a crash
                    undecodable.append(Rejected(i, "value", f"undecodable: {exc}"))
                    continue
            records.append(r)
            at.append(i)
        if not undecodable and len(at) == len(coords):
            return convert(kind, records, coords), False
        converted = convert(kind, records, [coords[i] for i in at])
        rejected = [Rejected(at[r.index], r.field, r.reason) for r in converted.rejected] + undecodable
        return Converted(converted.table, sorted(rejected, key=lambda r: r.index)), False

    def _rejected_key(self, kafka_ts_ms: int) -> PartitionKey:
        date = dt.datetime.fromtimestamp(kafka_ts_ms / 1000, tz=dt.UTC).date().isoformat()
        return PartitionKey(REJECTED, date, NO_INST_ID)

    async def _add(self, key: PartitionKey, tp: TopicPartition, bucket: int, item: Record | _Bulk | _Reject,
                   coord: Coordinates, avro_size: int, now: float) -> None:
        slot = (key, tp)
        durable = self._durable.get(slot)
        if durable is not None and coord.offset <= durable:
            self.stats.records_skipped += 1
            return
        buf = self._bufs.get(slot)
        if buf is not None and buf.bucket != bucket:
            buf.last_seen = -1e18  # another exchange-time bucket: this file closes first (same order)
            await self._flush_due(final=False, only=[slot])
            buf = self._bufs.get(slot)
            if buf is not None:  # the store is down: keep one file per slot, rotate when it is back
                bucket = buf.bucket
        if buf is None:
            buf = self._bufs[slot] = _Buf(key, tp, bucket, now)
            buf.entered_ms = _entered_ms(item, coord)
            self.stats.open_files = len(self._bufs)
        buf.items.append(item)
        buf.coords.append(coord)
        size = avro_size * (RAW_EXPANSION if isinstance(item, RawFrames) else RECORD_EXPANSION) + RECORD_OVERHEAD
        buf.nbytes += size
        buf.avro_bytes += avro_size
        buf.last_seen = now
        buf.last_ts = coord.kafka_ts_ms
        if coord.kafka_ts_ms > self._tp_ts.get(tp, 0):
            self._tp_ts[tp] = coord.kafka_ts_ms
        self.stats.buffered_bytes += size
        if self.stats.buffered_bytes > self.stats.peak_buffered_bytes:
            self.stats.peak_buffered_bytes = self.stats.buffered_bytes
        if buf.avro_bytes >= self.cfg.max_file_bytes:
            await self._flush_due(final=False, only=[slot])
        elif self.stats.buffered_bytes >= self.cfg.max_buffer_bytes:
            await self._flush_due(final=False, only=self._largest())

    def _largest(self) -> list[tuple[PartitionKey, TopicPartition]]:
        """The open files to write, largest first, to bring the shared budget back to three quarters."""
        over = self.stats.buffered_bytes - self.cfg.max_buffer_bytes * 3 // 4
        out = []
        for slot, b in sorted(self._bufs.items(), key=lambda kv: -kv[1].nbytes):
            if over <= 0:
                break
            out.append(slot)
            over -= b.nbytes
        return out

    def _recover(self, key: PartitionKey, tp: TopicPartition) -> int:
        """The largest last offset of this partition's files in the directory (-1: none); also drops the
        temporary files of a killed writer and lists files a crash kept out of the manifest."""
        rel = key.path()
        self.store.remove_temporaries(rel)
        last = -1
        names = self.store.list_names(rel)
        for name in names:
            fc = parse_file_name(name)
            if fc is not None and fc.topic == self._name_topic(tp) and fc.partition == tp.partition:
                last = max(last, fc.last_offset)
        listed = {f["name"] for f in self.manifests.load(key)["files"]}
        for name in names:
            if parse_file_name(name) is not None and name not in listed:
                self._relist(key, name)
        return last

    def _relist(self, key: PartitionKey, name: str) -> None:
        """Add a file that is on the store but not in the manifest (killed between the two writes)."""
        import hashlib

        import pyarrow.parquet as pq

        data = self.store.read_bytes(f"{key.path()}/{name}")
        if data is None:
            return
        table = pq.read_table(pa.BufferReader(data), columns=["_offset"])
        fc = parse_file_name(name)
        extra: dict[str, Any] = {"recovered": True, "records": distinct_offsets(table)}
        if fc is not None:
            extra |= {"firstOffset": fc.first_offset, "lastOffset": fc.last_offset, "partition": fc.partition}
        self.manifests.add_file(key, WrittenFile(name, table.num_rows, len(data), hashlib.sha256(data).hexdigest()),
                                extra)

    def drop_partitions(self, tps: Iterable[TopicPartition]) -> None:
        """Forget buffers and recovered state of partitions that moved (uncommitted: the owner redoes them)."""
        gone = set(tps)
        for slot in [s for s in self._bufs if s[1] in gone]:
            self.stats.buffered_bytes -= self._bufs.pop(slot).nbytes
        for slot in [s for s in self._durable if s[1] in gone]:
            del self._durable[slot]
        for tp in gone:
            self._next.pop(tp, None)
            self._committed.pop(tp, None)
            self._tp_ts.pop(tp, None)
            self._last_entered_ms.pop(tp, None)
        self.stats.open_files = len(self._bufs)

    # ---- writing files ------------------------------------------------------------------------------

    def _due(self, final: bool) -> list[tuple[PartitionKey, TopicPartition]]:
        now = self._clock()
        cfg = self.cfg
        idle_ms = cfg.idle_close_s * 1000
        due = [slot for slot, b in self._bufs.items()
               if final or b.avro_bytes >= cfg.max_file_bytes or now - b.last_seen >= cfg.idle_close_s
               or self._tp_ts.get(b.tp, 0) - b.last_ts >= idle_ms or now - b.opened >= cfg.max_open_s]
        if self.stats.buffered_bytes >= cfg.max_buffer_bytes:  # the shared budget: the largest files first
            due += [slot for slot in self._largest() if slot not in due]
        return due

    async def _flush_due(self, *, final: bool, only: list[tuple[PartitionKey, TopicPartition]] | None = None
                         ) -> None:
        if self._clock() < self._retry_at:
            return
        slots = only if only is not None else self._due(final)
        for slot in slots:
            buf = self._bufs.get(slot)
            if buf is None:
                continue
            try:
                if slot not in self._durable:  # first file of this slot in this process: what is there already
                    self._durable[slot] = await asyncio.to_thread(self._locked, self._recover, buf.key, buf.tp)
                self._drop_durable(buf, self._durable[slot])
                if buf.items:
                    await asyncio.to_thread(self._locked, self._write, buf.key, buf)
            except OSError as exc:
                self._store_failed(exc)
                return
            del self._bufs[slot]
            if buf.coords:
                self._durable[slot] = buf.coords[-1].offset
            self.stats.buffered_bytes -= buf.nbytes
            self.stats.open_files = len(self._bufs)
            if self.stats.store_error is not None:
                log.info("archive_store_back", extra={"url": self.store.url,
                                                      "down_s": round(self._clock() - (self.stats.store_down_since
                                                                                       or self._clock()), 1)})
            self.stats.store_error = None
            self.stats.store_down_since = None
            self._backoff = full_jitter(self.cfg.retry_initial_s, self.cfg.retry_max_s)

    def _drop_durable(self, buf: _Buf, durable: int) -> None:
        """Drop the records a durable file already holds (a redo after a crash); they are contiguous at the
        start of the buffer, because files of one slot are written in offset order."""
        n = 0
        while n < len(buf.coords) and buf.coords[n].offset <= durable:
            n += 1
        if n:
            del buf.items[:n]
            del buf.coords[:n]
            self.stats.records_skipped += n

    def _store_failed(self, exc: OSError) -> None:
        self.stats.store_failures += 1
        first = self.stats.store_error is None
        self.stats.store_error = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        if self.stats.store_down_since is None:
            self.stats.store_down_since = self._clock()
        delay = next(self._backoff)
        self._retry_at = self._clock() + delay
        (log.error if first else log.warning)("archive_store_failed", extra={
            "url": self.store.url, "error": self.stats.store_error, "retry_in_s": round(delay, 2),
            "note": "nothing committed; records are kept and retried"})

    def _locked(self, fn: Callable[..., _T], key: PartitionKey, *args: Any) -> _T:
        """`fn(key, *args)` holding the shared lock of the key's date, so `archive compact` never swaps a
        directory under a file and manifest being written (thread)."""
        with self.store.date_lock(key.date, exclusive=False):
            return fn(key, *args)

    def _write(self, key: PartitionKey, buf: _Buf) -> None:
        """Convert, write the file, then its manifest (thread). Unfit records go to `_rejected` first."""
        first, last = buf.coords[0].offset, buf.coords[-1].offset
        name = file_name(self._name_topic(buf.tp), buf.tp.partition, first, last)
        rejects: list[tuple[_Reject, Coordinates]] = []
        bulk = False
        if key.dataset == REJECTED:
            rejects = [(item, c) for item, c in zip(buf.items, buf.coords, strict=True) if isinstance(item, _Reject)]
            table = _rejected_table(rejects)
        else:
            converted, bulk = self._convert(TopicKind(key.dataset), buf.items, buf.coords)
            table = converted.table
            if converted.rejected:
                rejects = [(_Reject(f"does not fit: {r.reason}", r.field, None, None), buf.coords[r.index])
                           for r in converted.rejected]
                rkey = self._rejected_key(buf.coords[converted.rejected[0].index].kafka_ts_ms)
                # Named by the source file's coordinates (a redo rewrites the same object) behind the dataset,
                # so recovery never takes it for a file of undecodable records of this partition.
                rname = f"{key.dataset}+{name}"
                self.store.write_parquet(rkey.path(), rname, _rejected_table(rejects))
                self.stats.records_rejected += len(rejects)
        if key.dataset == REJECTED:
            self.stats.records_rejected += len(rejects)
        written = self.store.write_parquet(key.path(), name, table)
        extra: dict[str, Any] = {"records": len(buf.items), "firstOffset": first, "lastOffset": last,
                                 "topic": buf.tp.topic, "partition": buf.tp.partition,
                                 **(_table_stats(TopicKind(key.dataset), table) if bulk else _stats_of(buf.items))}
        if rejects and key.dataset != REJECTED:
            extra["rejected"] = len(rejects)  # counted in `records`, kept in _rejected instead of this file
        self.manifests.add_file(key, written, extra)
        for item in buf.items:
            if isinstance(item, GapEvent) and item.inst_id is not None:
                ds = dataset_of_channel(item.channel)
                if ds is not None:
                    gkey = PartitionKey(ds, key.date, item.inst_id)
                    self.manifests.note_gap(gkey, item)
        self.stats.files_written += 1
        self.stats.bytes_written += written.bytes
        self.stats.records_written += len(buf.items) - (len(rejects) if key.dataset != REJECTED else 0)
        log.debug("archive_file_written", extra={"path": f"{key.path()}/{name}", "rows": written.rows})

    # ---- committing ---------------------------------------------------------------------------------

    async def _commit(self) -> None:
        """Commit, per partition, up to the first record not yet in a durable file."""
        consumer = self._consumer
        if consumer is None:
            return
        low: dict[TopicPartition, int] = {}
        for (_, tp), buf in self._bufs.items():
            first = buf.coords[0].offset
            low[tp] = min(low.get(tp, first), first)
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for tp, nxt in self._next.items():
            target = low.get(tp, nxt)
            if self._committed.get(tp) != target:
                offsets[tp] = OffsetAndMetadata(target, "")
        if not offsets:
            return
        try:
            async with asyncio.timeout(5):  # a coordinator that does not answer must not stall the loop
                await consumer.commit(offsets)
        except Exception as exc:  # a rebalance or broker hiccup: redone later, nothing lost
            log.warning("archive_commit_failed", extra={"error": repr(exc)})
            return
        for tp, om in offsets.items():
            self._committed[tp] = om.offset
            self.stats.last_commit[f"{tp.topic}/{tp.partition}"] = om.offset

    async def caught_up(self) -> None:
        """Return once every record the broker holds now is consumed (polling; bound it with a timeout)."""
        while True:
            consumer = self._consumer
            if consumer is not None and self.started.is_set():
                tps = consumer.assignment()
                if tps:
                    ends = await consumer.end_offsets(list(tps))
                    if all(self._next.get(tp, 0) >= end for tp, end in ends.items()):
                        return
            await asyncio.sleep(0.1)  # polling the consumer's progress against the broker's end offsets

    # ---- health -------------------------------------------------------------------------------------

    def readiness(self) -> Readiness:
        reasons: list[str] = []
        if not self.started.is_set():
            reasons.append("starting")
        if self.stats.store_error is not None:
            reasons.append(f"archive store failing: {self.stats.store_error}")
        if self.stats.buffered_bytes >= self.cfg.max_buffer_bytes:
            reasons.append("buffer full: consumption paused until the store accepts files")
        return Readiness(not reasons, tuple(reasons), {"open_files": len(self._bufs), "url": self.store.url,
                                                       "partitions": self.stats.partitions})

    def lag_s(self, now_ms: int | None = None) -> float:
        """How far the archive is behind Kafka: the age of the oldest record of this member's partitions not
        yet in a durable file, by its receive time (Kafka's timestamp for records without one). Buffered
        records count from the first of each open file; a partition with records still to fetch, from the
        last record fetched (an upper bound by at most the gap to the next)."""
        now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        oldest = [b.entered_ms for b in self._bufs.values()]
        consumer = self._consumer
        if consumer is not None:
            for tp, nxt in self._next.items():
                high = consumer.highwater(tp)
                if high is not None and high > nxt and tp in self._last_entered_ms:
                    oldest.append(self._last_entered_ms[tp])
        self.stats.lag_s = max(0.0, (now_ms - min(oldest)) / 1000) if oldest else 0.0
        return self.stats.lag_s

    def metrics(self) -> list[Any]:
        s = self.stats
        out: list[Any] = []
        for name, doc, value in (
                ("archive_records_in", "Records consumed by the archiver", s.records_in),
                ("archive_records_written", "Records written into archive files", s.records_written),
                ("archive_records_skipped", "Records skipped because a durable file holds them (redo)",
                 s.records_skipped),
                ("archive_records_rejected", "Records written to the _rejected dataset", s.records_rejected),
                ("archive_files_written", "Archive files written", s.files_written),
                ("archive_bytes_written", "Bytes of archive files written", s.bytes_written),
                ("archive_store_failures", "Failed writes to the archive store (alert on rate)", s.store_failures)):
            c = counter(name, doc)
            c.add_metric([], value)
            out.append(c)
        for name, doc, gvalue in (
                ("archive_buffered_bytes", "Estimated bytes of records waiting in open files", s.buffered_bytes),
                ("archive_open_files", "Open (buffered) archive files", len(self._bufs)),
                ("archive_lag_seconds", "Age of the oldest record not yet in a durable archive file (alert)",
                 self.lag_s()),
                ("archive_store_down", "1 while the archive store rejects writes (alert)",
                 int(s.store_error is not None))):
            g = gauge(name, doc)
            g.add_metric([], gvalue)
            out.append(g)
        return out


def _rejected_table(rejects: list[tuple[_Reject, Coordinates]]) -> pa.Table:
    return pa.table({
        "reason": pa.array([r.reason for r, _ in rejects], pa.string()),
        "field": pa.array([r.field for r, _ in rejects], pa.string()),
        "_topic": pa.array([c.topic for _, c in rejects], pa.string()),
        "_partition": pa.array([c.partition for _, c in rejects], pa.int32()),
        "_offset": pa.array([c.offset for _, c in rejects], pa.int64()),
        "_kafka_ts": pa.array([c.kafka_ts_ms for _, c in rejects], pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
        "key": pa.array([r.key for r, _ in rejects], pa.binary()),
        "value": pa.array([r.value for r, _ in rejects], pa.binary()),
    }).cast(_REJECTED_SCHEMA)


def _entered_ms(item: Record | _Bulk | _Reject, coord: Coordinates) -> int:
    """When a record entered the system: its receive time, else its Kafka timestamp (gaps, dead letters)."""
    recv = getattr(item, "recv_ts_ns", None)
    return recv // 1_000_000 if isinstance(recv, int) and recv > 0 else coord.kafka_ts_ms


def distinct_offsets(table: pa.Table) -> int:
    """How many Kafka records a file's table holds (book records span several rows with one `_offset`)."""
    if "_offset" not in table.column_names:
        return int(table.num_rows)
    return int(pc.count_distinct(table.column("_offset")).as_py())


def _schema_header(headers: Iterable[tuple[str, bytes]] | None) -> str | None:
    """The `schema` header (the Avro full name) of a Confluent-framed value."""
    for k, v in headers or ():
        if k == "schema":
            return v.decode()
    return None


def _topics_pattern(topics: list[str]) -> str:
    import re

    return "^(" + "|".join(re.escape(t) for t in topics) + ")$"


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


def open_store(cfg: ArchiveSettings, *, write: bool = True) -> ArchiveStore:
    """The configured store, checked writable, or only readable with `write=False` (`archive verify`, which
    must work with read-only access and change nothing); ConfigError naming archive.url otherwise."""
    store = ArchiveStore.from_url(cfg.url, endpoint_override=cfg.s3_endpoint_override, region=cfg.s3_region)
    if write:
        store.check_writable()
    else:
        store.check_readable()
    return store


async def run_archiver(settings: Settings, *, stop: asyncio.Event | None = None) -> int:
    """`okx-ingest archive`: one member of the archive group until SIGTERM/SIGINT, on the shared `Runtime`.

    0 on a clean stop, 1 when the archiver died (or ended without being asked), 2 on bad configuration or an
    `IngestError` (store missing, denied).
    """
    from ingest.services.process import configure_observability, install_signals

    configure_observability(settings)
    stop = stop or asyncio.Event()
    reload = asyncio.Event()
    remove_signals = install_signals(stop, reload)
    health: HealthServer | None = None
    try:
        try:
            store = await asyncio.to_thread(open_store, settings.archive)
        except IngestError as exc:
            log.error("archive_startup_failed", extra={"error": str(exc)})
            print(f"okx-ingest: {exc}", flush=True)
            return EXIT_CONFIG
        archiver = Archiver(settings, store)
        registry, collector = new_component_registry("archive")
        collector.add(archiver.metrics)
        health = HealthServer(registry, archiver.readiness, settings.obs.metrics_host, settings.archive.metrics_port)
        await health.start()
        log.info("archive_where", extra={"url": store.url, "query": query_hint(store)})
        # Its stop is bounded step by step (drain, consumer); the runtime bounds the whole and surfaces the cause.
        budget_s = settings.archive.drain_timeout_s + 2 * _CONSUMER_STOP_S
        async with Runtime("archive", stop_timeout_s=budget_s) as runtime:
            archiver_stop = asyncio.Event()
            task = runtime.spawn("archiver", archiver.run(archiver_stop), essential=True)
            ended = await runtime.wait(stop)
            archiver_stop.set()
            if runtime.pop("archiver") is not None:
                await finish_task(task, budget_s, what="archiver")
        if isinstance(ended.error, IngestError):
            log.error("archive_failed", extra={"error": str(ended.error)})
            return EXIT_CONFIG
        if ended.task is not None:
            return EXIT_TASK_DIED  # the runtime logged the cause (task_died)
        log.info("archive_stopped", extra={"files": archiver.stats.files_written,
                                           "records": archiver.stats.records_written})
        return EXIT_OK
    finally:
        if health is not None:
            await health.stop()
        remove_signals()


def query_hint(store: ArchiveStore) -> str:
    """The one DuckDB line that queries this archive's trades."""
    root = store.root if store.local else store.url.rstrip("/")
    return (f"duckdb -c \"select instId, count(*) from read_parquet('{root}/trades/**/*.parquet', "
            "hive_partitioning=true) group by all\"")
