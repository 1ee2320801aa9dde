"""`okx-ingest tail`: a decoded view of any topic, like `kcat -C` with the project's schemas.

Reads every partition of the topics given (without a consumer group, so it moves no one's offsets), decodes
single-object and Confluent framed values (Confluent through the `schema` header, or the registry's id when the
header is missing), and prints one line per record: a table for people or JSON lines for tools. Decimals are
printed as the exact strings OKX sent; gaps and dead letters get their own readable lines.

Where to start:
- default: the beginning of each partition;
- `--last N`: the last N records of all partitions together;
- `--from ISO`: the first record at or after that time.
The broker is not trusted on two answers: an end offset (ListOffsets) may lag behind the last batch (the
embedded broker answers with the start of its last batch), so reads go on to the high watermark that fetches
report; and a time lookup (OffsetsForTimes) may answer 0 for any time (the embedded broker does), so an answer
is checked against the records' own timestamps and, if wrong, the offset is found by binary search on them
(this assumes timestamps mostly increase within a partition, which holds for recorded exchange times).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TextIO

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from ingest.config import Settings
from ingest.core.avro import DecodeError, decode_fields, read_framing
from ingest.core.records import TopicKind
from ingest.errors import ConfigError, IngestError
from ingest.io.kafka_security import diagnose_tls, kafka_client_kwargs
from ingest.io.registry import RegistryError, SchemaRegistry

log = logging.getLogger(__name__)

Format = Literal["table", "json"]
_POLL_MS = 300
#: Fields every market record has: shown in the table's fixed columns (or not at all), not in its summary.
_COMMON = {"exchange", "channel", "instId", "instType", "ts", "recvTsNs", "source", "connId", "recvSeq",
           "recordId"}


class TailError(IngestError):
    """A topic cannot be read (missing, or the broker refuses); the message names it."""


@dataclass(frozen=True, slots=True)
class Shown:
    """One record as tail shows it."""

    topic: str
    partition: int
    offset: int
    ts_ms: int
    key: str | None
    schema: str | None
    fields: dict[str, Any] | None
    error: str | None  # why the value could not be decoded (then `fields` is None)


def bootstrap_of(settings: Settings, override: str | None) -> str:
    """Where to read: `--bootstrap`, else the settings' servers (a local recorder's embedded broker port)."""
    if override:
        return override
    kafka = settings.kafka
    return f"127.0.0.1:{kafka.embedded_port}" if kafka.embedded else kafka.bootstrap_servers


def topic_names(settings: Settings, topics: Sequence[str]) -> list[str]:
    """Full topic names: a bare kind (`trades`, `gaps`, `dlq`) gets the configured prefix."""
    kinds = {k.value for k in TopicKind} | {"raw"}
    prefix = settings.kafka.topic_prefix
    return [f"{prefix}{t}" if t in kinds and not t.startswith(prefix) else t for t in topics]


# -- decoding and printing --------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Avro bytes as text when they are UTF-8 (raw frames, dead letters' payloads), else base64."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def shown(msg: ConsumerRecord[bytes, bytes], schema_ids: Mapping[int, str] | None = None) -> Shown:
    """Decode one consumed record; an undecodable value is shown with the reason, never raised."""
    headers = {k: v for k, v in (msg.headers or ())}
    header_schema = headers.get("schema")
    schema_name = header_schema.decode("utf-8", "replace") if header_schema else None
    key = msg.key.decode("utf-8", "replace") if msg.key is not None else None
    fields: dict[str, Any] | None = None
    error: str | None = None
    if msg.value is None:
        error = "tombstone (no value)"
    else:
        try:
            schema_name, raw = decode_fields(msg.value, schema_name=schema_name, schema_ids=schema_ids)
            fields = _jsonable(raw)
        except DecodeError as exc:
            error = str(exc)
    return Shown(msg.topic, msg.partition, msg.offset, msg.timestamp, key, schema_name, fields, error)


def _iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _pos(p: Any) -> str:
    if not isinstance(p, dict):
        return "-"
    parts = [f"{k}={_iso(v) if k == 'ts' else v}" for k, v in p.items() if v is not None]
    return ",".join(parts) or "-"


def _levels(levels: Any) -> str:
    if not isinstance(levels, list) or not levels:
        return "[]"
    best = levels[0]
    more = f" +{len(levels) - 1}" if len(levels) > 1 else ""
    return f"{best[0]}x{best[1]}{more}" if isinstance(best, list) and len(best) >= 2 else str(best)


def summary(s: Shown) -> str:
    """The record's own fields in one line (exact decimal strings as stored)."""
    f = s.fields
    if f is None:
        return f"UNDECODABLE: {s.error}"
    name = (s.schema or "").rsplit(".", 1)[-1]
    if name == "GapEvent":
        filled = f.get("recordsFilled")
        return (f"GAP {f.get('status')} {f.get('kind')} {f.get('channel')} {f.get('instId') or '*'} "
                f"from {_pos(f.get('before'))} to {_pos(f.get('after'))} reason={f.get('reason')!r}"
                + (f" filled={filled}" if filled is not None else "") + f" attempts={f.get('attempts')}"
                + (f" note={f.get('note')!r}" if f.get("note") else "") + f" id={f.get('gapId')}")
    if name == "DeadLetter":
        raw = f.get("raw")
        text = raw if isinstance(raw, str) else json.dumps(raw)
        snippet = text[:160] + ("…" if len(text) > 160 else "")
        return (f"DEAD LETTER {f.get('reasonCode') or '-'}: {f.get('reason')} at {f.get('path') or '-'} "
                f"(conn {f.get('connId') or '-'} #{f.get('recvSeq') or '-'}) raw={snippet}")
    if name == "BookUpdate":
        return (f"{f.get('action')} bid {_levels(f.get('bids'))} ask {_levels(f.get('asks'))} "
                f"seqId={f.get('seqId')} prev={f.get('prevSeqId')} checksum={f.get('checksum')}")
    if name == "RawFrames":
        frames = f.get("frames") or []
        first = frames[0].get("payload", "") if frames else ""
        text = first if isinstance(first, str) else json.dumps(first)
        return f"{len(frames)} frame(s) on {f.get('connId')} {f.get('name')}: {text[:160]}"
    parts = []
    for k, v in f.items():
        if k in _COMMON or v is None or v == {} or v == []:
            continue
        parts.append(f"{k}={v}" if not isinstance(v, dict | list) else f"{k}={json.dumps(v)[:80]}")
    return " ".join(parts)


def table_line(s: Shown) -> str:
    f = s.fields or {}
    ts = f.get("ts") if isinstance(f.get("ts"), int) else s.ts_ms
    inst = f.get("instId") or s.key or "-"
    src = f.get("source") or ""
    channel = f.get("channel") if "exchange" in f and "ts" in f else ""  # market records: trades vs trades-all
    return f"{_iso(ts)}  {s.topic}[{s.partition}]@{s.offset:<6}  {inst:<16} {channel or '':<10} {src:<4} {summary(s)}"


def json_line(s: Shown) -> str:
    out: dict[str, Any] = {"topic": s.topic, "partition": s.partition, "offset": s.offset,
                           "timestamp": _iso(s.ts_ms), "key": s.key, "schema": s.schema}
    if s.fields is not None:
        out["value"] = s.fields
    else:
        out["error"] = s.error
    return orjson.dumps(out, default=str).decode()


def matches(s: Shown, inst: str | None) -> bool:
    if inst is None:
        return True
    return (s.fields or {}).get("instId") == inst or s.key == inst


# -- positions -----------------------------------------------------------------------------------------------


async def _record_at(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int,
                     timeout_s: float) -> ConsumerRecord[bytes, bytes] | None:
    """The first record at or after `offset` in `tp` (None past the end)."""
    consumer.seek(tp, offset)
    async with asyncio.timeout(timeout_s):
        while True:
            got = await consumer.getmany(tp, timeout_ms=_POLL_MS, max_records=1)
            for msgs in got.values():
                if msgs:
                    return msgs[0]
            hw = consumer.highwater(tp)
            if hw is not None and await consumer.position(tp) >= hw:
                return None


async def offset_for_time(consumer: AIOKafkaConsumer, tp: TopicPartition, ts_ms: int, begin: int, end: int,
                          timeout_s: float) -> int:
    """The first offset whose record is at or after `ts_ms`: the broker's answer if the records agree, else a
    binary search on the records' timestamps (module docstring)."""
    answer = (await consumer.offsets_for_times({tp: ts_ms})).get(tp)
    if answer is not None and answer.offset > begin:
        at = await _record_at(consumer, tp, answer.offset, timeout_s)
        before = await _record_at(consumer, tp, answer.offset - 1, timeout_s)
        if at is not None and at.timestamp >= ts_ms and before is not None and before.timestamp < ts_ms:
            return int(answer.offset)
    lo, hi = begin, end  # end may lag: the answer may lie in [end, true end); reading on from `end` finds it
    while lo < hi:
        mid = (lo + hi) // 2
        rec = await _record_at(consumer, tp, mid, timeout_s)
        if rec is None or rec.timestamp >= ts_ms:
            hi = mid
        else:
            lo = rec.offset + 1 if rec.offset >= mid else mid + 1
    return lo


# -- the tool ------------------------------------------------------------------------------------------------


async def _partitions(consumer: AIOKafkaConsumer, topics: Iterable[str], timeout_s: float) -> list[TopicPartition]:
    existing = await consumer.topics()
    tps: list[TopicPartition] = []
    for topic in topics:
        if topic not in existing:
            raise TailError(f"topic {topic} does not exist on this cluster (topics there: "
                            f"{', '.join(sorted(t for t in existing if not t.startswith('__'))[:20]) or 'none'})")
        parts = consumer.partitions_for_topic(topic) or set()
        tps.extend(TopicPartition(topic, p) for p in sorted(parts))
    return tps


async def tail(settings: Settings, topics: Sequence[str], *, out: TextIO, inst: str | None = None,
               from_ms: int | None = None, last: int | None = None, follow: bool = False,
               fmt: Format = "table", bootstrap: str | None = None, stop: asyncio.Event | None = None,
               timeout_s: float = 30.0, registry_ids: Mapping[int, str] | None = None) -> int:
    """Print the records of `topics`; returns how many were printed. Stops at the end unless `follow`
    (then at `stop`, Ctrl-C)."""
    if from_ms is not None and last is not None:
        raise ConfigError("--from/--last", "both given", "give one of them")
    if last is not None and last <= 0:
        raise ConfigError("--last", f"must be > 0, got {last}", "give how many records to show, e.g. --last 20")
    names = topic_names(settings, topics)
    address = bootstrap_of(settings, bootstrap)
    stop = stop or asyncio.Event()
    consumer = AIOKafkaConsumer(**kafka_client_kwargs(settings.kafka, bootstrap_servers=address,
                                                      client_id=f"{settings.kafka.client_id}-tail"),
                                group_id=None, enable_auto_commit=False, auto_offset_reset="earliest")
    try:
        async with asyncio.timeout(timeout_s):
            await consumer.start()
    except (KafkaError, OSError, TimeoutError) as exc:
        with contextlib.suppress(Exception):
            await consumer.stop()
        why = await diagnose_tls(settings.kafka, address)
        raise TailError(f"cannot reach Kafka at {address}: {why or exc or type(exc).__name__}"
                        + ("" if why else " (a local demo prints its address; pass it with --bootstrap)")) from None
    printed = 0
    try:
        tps = await _partitions(consumer, names, timeout_s)
        consumer.assign(tps)
        begins = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            start = begins[tp]
            if from_ms is not None:
                start = await offset_for_time(consumer, tp, from_ms, begins[tp], ends[tp], timeout_s)
            elif last is not None:
                start = max(begins[tp], ends[tp] - last)  # the end may lag: read on to the true end, keep last N
            consumer.seek(tp, start)
        ids = dict(registry_ids or {})
        registry = _registry(settings)
        pending: list[Shown] | None = []  # --last: everything read until all partitions caught up, then the last N
        caught_up: set[TopicPartition] = set()
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=_POLL_MS)
            msgs = [m for part in batch.values() for m in part]
            if registry is not None:
                await _resolve_ids(registry, msgs, ids)
            fresh = [s for s in (shown(m, ids) for m in msgs)
                     if matches(s, inst) and (from_ms is None or s.ts_ms >= from_ms)]
            for tp in tps:
                if tp in caught_up:
                    continue
                hw = consumer.highwater(tp)
                position = await consumer.position(tp)
                if (hw is not None and position >= hw) or (hw is None and not batch and position >= ends[tp]):
                    caught_up.add(tp)
            if last is not None and pending is not None:
                pending.extend(fresh)
                if len(caught_up) == len(tps):
                    printed += _emit(sorted(pending, key=_order)[-last:], out, fmt)
                    pending = None
            else:
                printed += _emit(sorted(fresh, key=_order), out, fmt)
            if len(caught_up) == len(tps) and not follow:
                break
        if registry is not None:
            await registry.aclose()
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
    return printed


def _order(s: Shown) -> tuple[int, str, int, int]:
    return s.ts_ms, s.topic, s.partition, s.offset


def _registry(settings: Settings) -> SchemaRegistry | None:
    """The registry, only to name the schema of Confluent values that lack our `schema` header (other producers)."""
    return SchemaRegistry.from_settings(settings.kafka) if settings.kafka.schema_registry_url else None


async def _resolve_ids(registry: SchemaRegistry, msgs: Iterable[ConsumerRecord[bytes, bytes]],
                       ids: dict[int, str]) -> None:
    for m in msgs:
        if m.value is None or any(k == "schema" for k, _ in (m.headers or ())):
            continue
        try:
            framing = read_framing(m.value)
        except DecodeError:
            continue
        if framing.schema_id is None or framing.schema_id in ids:
            continue
        try:
            text = json.loads(await registry.schema_text(framing.schema_id))
            ids[framing.schema_id] = f"{text['namespace']}.{text['name']}" if text.get("namespace") else text["name"]
        except (RegistryError, ValueError, KeyError, TypeError) as exc:
            log.warning("tail_schema_id_unresolved", extra={"schema_id": framing.schema_id, "error": str(exc)})
            ids[framing.schema_id] = ""


def _emit(items: Iterable[Shown], out: TextIO, fmt: Format) -> int:
    n = 0
    for s in items:
        out.write((json_line(s) if fmt == "json" else table_line(s)) + "\n")
        n += 1
    out.flush()
    return n
