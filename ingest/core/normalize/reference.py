"""The reference path: any frame -> records, an OKX event or a dead letter, every field checked by hand.

Every channel we have a record for goes through here; the fast paths (`fast.py`) only take frames this
path would accept and must give equal results (tests/unit/test_normalize.py checks it)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, NoReturn

import msgspec

from ingest.core.events import InboundFrame
from ingest.core.normalize.checks import (
    _INT64_MAX,
    _INT64_MIN,
    _INTEGER,
    _LEVELS_MATCH,
    _MISSING,
    _POSITIVE,
    B,
    D,
    I,
    J,
    L,
    S,
    _check,
    _check_decimal,
    _Ctx,
    _epoch_ms,
    _extras,
    _Invalid,
    _json_text,
    _missing,
    _opt_long,
    _req_decimal,
    _req_str,
    _req_ts,
    _show,
    _Spec,
    _type_name,
    _wrong_type,
)
from ingest.core.normalize.results import BookPush, Normalized, OkxEvent, RecordPush, TradePush, TradeRef
from ingest.core.normalize.specs import (
    _ALGO_ORDER,
    _BALANCE,
    _FILL,
    _FUNDING_RATE,
    _INDEX_TICKER,
    _INSTRUMENT,
    _LIQUIDATION,
    _LIQUIDATION_ROW,
    _MARK_PRICE,
    _OPEN_INTEREST,
    _ORDER,
    _POSITION,
    _PRICE_LIMIT,
    _TICKER,
)
from ingest.core.records import (
    Balance,
    BookAction,
    BookLevel,
    BookUpdate,
    Candle,
    DeadLetter,
    DeadLetterReason,
    OkxRecord,
    Source,
    Trade,
)
from ingest.okx.channels import BOOK_CHANNELS, SNAPSHOT_BOOK_CHANNELS, SubArg, candle_bar, endpoint_for

_TRADE_KEYS = frozenset({"instId", "tradeId", "px", "sz", "side", "ts", "count", "source", "seqId"})


def _trade(row: object, ctx: _Ctx, index: int) -> tuple[Trade, TradeRef]:
    """One trades / trades-all row (also a REST trades row): the hot path, checked field by field."""
    if type(row) is not dict:
        _wrong_type("", row, "an object")
    inst_id = _req_str(row, "instId")
    if ctx.inst_id is not None and inst_id != ctx.inst_id:
        raise _Invalid(DeadLetterReason.BAD_VALUE, "instId", f"{inst_id!r} differs from arg.instId {ctx.inst_id!r}")
    trade_id = row.get("tradeId", _MISSING)
    if type(trade_id) is not str or _INTEGER(trade_id) is None:
        if trade_id is _MISSING:
            _missing("tradeId")
        if type(trade_id) is str:
            raise _Invalid(DeadLetterReason.BAD_NUMBER, "tradeId", f"{_show(trade_id)} is not an integer")
        _wrong_type("tradeId", trade_id, "an integer string")
    tid = int(trade_id)
    if not _INT64_MIN <= tid <= _INT64_MAX:
        # Gap bounds carry it as an Avro long (okx.gaps before/after.tradeId, the stream-state file).
        raise _Invalid(DeadLetterReason.BAD_NUMBER, "tradeId", f"{_show(trade_id)} does not fit a 64-bit integer")
    px = _req_decimal(row, "px")
    sz = _req_decimal(row, "sz")
    side = row.get("side", _MISSING)
    if side != "buy" and side != "sell":
        if side is _MISSING:
            _missing("side")
        if type(side) is str:
            raise _Invalid(DeadLetterReason.BAD_VALUE, "side", f"{_show(side)} is not buy or sell")
        _wrong_type("side", side, "a string")
    ts = _req_ts(row)
    present = 6
    count = row.get("count", _MISSING)
    if count is _MISSING:
        count = None
        n = 1
    elif type(count) is str and _POSITIVE(count) is not None:
        present += 1
        n = int(count)
    elif type(count) is str:
        raise _Invalid(DeadLetterReason.BAD_VALUE, "count", f"{_show(count)} is not a positive integer")
    else:
        _wrong_type("count", count, "a positive integer string")
    okx_source = row.get("source", _MISSING)
    if okx_source is _MISSING:
        okx_source = None
    elif type(okx_source) is str:
        present += 1
    else:
        _wrong_type("source", okx_source, "a string")
    seq_id = _opt_long(row, "seqId")
    if seq_id is not None:
        present += 1
    extra = {**ctx.extra, **_extras(row, _TRADE_KEYS)} if len(row) != present else dict(ctx.extra)
    record = Trade(channel=ctx.channel, inst_id=inst_id, ts=ts, recv_ts_ns=ctx.recv_ts_ns, source=ctx.source,
                   conn_id=ctx.conn, recv_seq=ctx.recv_seq, record_id=f"{ctx.rid_prefix}{index}", trade_id=trade_id,
                   px=px, sz=sz, side=side, count=count, seq_id=seq_id, okx_source=okx_source, extra=extra)
    return record, TradeRef(tid, n, seq_id, ts)


def _levels(row: Mapping[str, object], key: str) -> tuple[BookLevel, ...]:
    """One side of a book row: every level four strings, px and sz decimal, the other two integers."""
    levels = row.get(key, _MISSING)
    if type(levels) is not list:
        if levels is _MISSING:
            _missing(key)
        _wrong_type(key, levels, "an array of levels")
    if not levels:
        return ()
    try:
        # "#" for anything but a 4-element list makes the regex fail, so the slow path names the culprit
        joined = ";".join(["|".join(level) if type(level) is list and len(level) == 4 else "#" for level in levels])
    except TypeError:  # a non-string inside a level
        joined = None
    if joined is None or _LEVELS_MATCH(joined) is None:
        _find_bad_level(key, levels)
    return tuple(map(tuple, levels))


def _find_bad_level(key: str, levels: list[object]) -> NoReturn:
    """Name the first level that failed the one-regex check."""
    for i, level in enumerate(levels):
        where = f"{key}[{i}]"
        if type(level) is not list:
            _wrong_type(where, level, "a level array [px, sz, \"0\", numOrders]")
        if len(level) != 4:
            raise _Invalid(DeadLetterReason.BAD_VALUE, where, f"a level has 4 items, not {len(level)}: {_show(level)}")
        for j, item in enumerate(level):
            if type(item) is not str:
                _wrong_type(f"{where}[{j}]", item, "a string")
        for j in (0, 1, 2):
            _check_decimal(f"{where}[{j}]", level[j])
        if _INTEGER(level[3]) is None or level[3].startswith("-"):
            raise _Invalid(DeadLetterReason.BAD_NUMBER, f"{where}[3]", f"{_show(level[3])} is not an order count")
    # Every level passed on its own, so the joined form failed on a separator inside a string.
    raise _Invalid(DeadLetterReason.BAD_VALUE, key, "a level string contains '|' or ';'")


_BOOK_KEYS = frozenset({"asks", "bids", "ts", "checksum", "seqId", "prevSeqId", "instId"})


def _book(row: object, ctx: _Ctx, index: int, action: BookAction) -> BookUpdate:
    if type(row) is not dict:
        _wrong_type("", row, "an object")
    asks = _levels(row, "asks")
    bids = _levels(row, "bids")
    ts = _req_ts(row)
    inst_id = row.get("instId", _MISSING)
    if inst_id is _MISSING:
        if ctx.inst_id is None:
            raise _Invalid(DeadLetterReason.MISSING_FIELD, "instId", "neither the row nor arg has an instId")
        inst_id = ctx.inst_id
    elif type(inst_id) is not str or not inst_id:
        _wrong_type("instId", inst_id, "a non-empty string")
    elif ctx.inst_id is not None and inst_id != ctx.inst_id:
        raise _Invalid(DeadLetterReason.BAD_VALUE, "instId", f"{inst_id!r} differs from arg.instId {ctx.inst_id!r}")
    seq_id = _opt_long(row, "seqId")
    prev_seq_id = _opt_long(row, "prevSeqId")
    checksum = _opt_long(row, "checksum")
    extra = dict(ctx.extra) if _BOOK_KEYS.issuperset(row) else {**ctx.extra, **_extras(row, _BOOK_KEYS)}
    return BookUpdate(channel=ctx.channel, inst_id=inst_id, ts=ts, recv_ts_ns=ctx.recv_ts_ns, source=ctx.source,
                      conn_id=ctx.conn, recv_seq=ctx.recv_seq, record_id=f"{ctx.rid_prefix}{index}", action=action,
                      asks=asks, bids=bids, seq_id=seq_id, prev_seq_id=prev_seq_id, checksum=checksum, extra=extra)


_CANDLE_FIELDS = ("ts", "o", "h", "l", "c", "vol", "volCcy", "volCcyQuote", "confirm")
# Element names by array length. candle<bar>: 7 (2021), 8 (confirm added), 9 (volCcyQuote added before it).
# mark-price-candle<bar> / index-candle<bar>: 5, or 6 with confirm.
_CANDLE_LAYOUTS: dict[tuple[bool, int], tuple[str, ...]] = {
    (False, 7): ("ts", "o", "h", "l", "c", "vol", "volCcy"),
    (False, 8): ("ts", "o", "h", "l", "c", "vol", "volCcy", "confirm"),
    (False, 9): _CANDLE_FIELDS,
    (True, 5): ("ts", "o", "h", "l", "c"),
    (True, 6): ("ts", "o", "h", "l", "c", "confirm"),
}


def _candle(row: object, ctx: _Ctx, index: int) -> Candle:
    if type(row) is not list:
        _wrong_type("", row, "a candle array")
    bar = candle_bar(ctx.channel)
    if bar is None:
        raise _Invalid(DeadLetterReason.UNKNOWN_CHANNEL, "", f"{ctx.channel!r} is not a candle channel")
    price_only = not ctx.channel.startswith("candle")
    longest = 6 if price_only else 9
    layout = _CANDLE_LAYOUTS.get((price_only, min(len(row), longest)))
    if layout is None:
        expected = "5 or 6" if price_only else "7 to 9"
        raise _Invalid(DeadLetterReason.BAD_VALUE, "", f"a candle array has {expected} elements, got {len(row)}")
    values: dict[str, Any] = {}
    for i, name in enumerate(layout):
        item = row[i]
        if type(item) is not str:
            _wrong_type(f"[{i}]", item, "a string")
        if name == "ts":
            values["ts"] = _epoch_ms(f"[{i}]", item)
        elif name == "confirm":
            if item not in ("0", "1"):
                raise _Invalid(DeadLetterReason.BAD_VALUE, f"[{i}]", f"confirm is \"0\" or \"1\", got {_show(item)}")
            values["confirm"] = item == "1"
        else:
            if not item and name in ("o", "h", "l", "c"):
                raise _Invalid(DeadLetterReason.BAD_VALUE, f"[{i}]", f"{name} is empty")
            values[name] = _check(D, f"[{i}]", item, False)
    extra = dict(ctx.extra)
    if len(row) > longest:  # elements OKX appended after the documented ones
        extra.update({f"[{i}]": _json_text(v) for i, v in enumerate(row) if i >= longest})
    if ctx.inst_id is None:
        raise _Invalid(DeadLetterReason.MISSING_FIELD, "instId", "a candle push needs arg.instId")
    return Candle(channel=ctx.channel, inst_id=ctx.inst_id, inst_type=ctx.inst_type, ts=values["ts"],
                  recv_ts_ns=ctx.recv_ts_ns, source=ctx.source, conn_id=ctx.conn, recv_seq=ctx.recv_seq,
                  record_id=f"{ctx.rid_prefix}{index}", bar=bar, o=values["o"], h=values["h"], l=values["l"],
                  c=values["c"], vol=values.get("vol"), vol_ccy=values.get("volCcy"),
                  vol_ccy_quote=values.get("volCcyQuote"), confirm=values.get("confirm"), extra=extra)


def _liquidations(row: object, ctx: _Ctx, start: int) -> list[OkxRecord]:
    """One liquidation-orders row -> one record per detail, each carrying the row's instrument fields."""
    if type(row) is not dict:
        _wrong_type("", row, "an object")
    details = row.get("details", _MISSING)
    if type(details) is not list:
        if details is _MISSING:
            _missing("details")
        _wrong_type("details", details, "an array")
    inst_id = _req_str(row, "instId")
    parent = {k: v for k, v in row.items() if k in ("instId", "instType", "instFamily", "uly")}
    parent_extra = _extras(row, _LIQUIDATION_ROW, "parent.")
    sub = _Ctx(channel=ctx.channel, conn=ctx.conn, recv_seq=ctx.recv_seq, recv_ts_ns=ctx.recv_ts_ns,
               source=ctx.source, rid_prefix=ctx.rid_prefix, inst_id=inst_id, inst_type=ctx.inst_type,
               extra=ctx.extra)
    out: list[OkxRecord] = []
    for i, detail in enumerate(details):
        if type(detail) is not dict:
            raise _Invalid(DeadLetterReason.WRONG_TYPE, f"details[{i}]", "expected an object")
        try:
            out.append(_LIQUIDATION.build({**parent, **detail}, sub.common(start + i), sub,
                                          parent_extra=parent_extra))
        except _Invalid as exc:
            raise exc.under(f"details[{i}]") from None
    return out


def _account(row: object, ctx: _Ctx, start: int, push: Mapping[str, object]) -> list[OkxRecord]:
    """One account row -> the totals record (ccy null) and one record per currency detail."""
    if type(row) is not dict:
        _wrong_type("", row, "an object")
    details = row.get("details", [])
    if type(details) is not list:
        _wrong_type("details", details, "an array")
    totals = {k: v for k, v in row.items() if k != "details"}
    out: list[OkxRecord] = [_balance(totals, ctx, start, push)]
    for i, detail in enumerate(details):
        try:
            if type(detail) is not dict:
                _wrong_type("", detail, "an object")
            ccy = detail.get("ccy", _MISSING)
            if type(ccy) is not str or not ccy:
                if ccy is _MISSING:
                    _missing("ccy")
                if ccy == "":
                    raise _Invalid(DeadLetterReason.BAD_VALUE, "ccy", "a currency row without a currency")
                _wrong_type("ccy", ccy, "a string")
            out.append(_balance(detail, ctx, start + 1 + i, push))
        except _Invalid as exc:
            raise exc.under(f"details[{i}]") from None
    return out


def _balance(row: Mapping[str, object], ctx: _Ctx, index: int, more: Mapping[str, object],
             parent_extra: Mapping[str, str] | None = None) -> OkxRecord:
    """A Balance from one object; its ts is uTime, or pTime when uTime is empty."""
    record = _BALANCE.build(row, ctx.common(index), ctx, more={"uid": ctx.uid, **more}, parent_extra=parent_extra)
    assert isinstance(record, Balance)
    if record.u_time:
        ts = _epoch_ms("uTime", record.u_time)
    elif record.p_time:
        ts = _epoch_ms("pTime", record.p_time)
    else:
        raise _Invalid(DeadLetterReason.MISSING_FIELD, "uTime", "no uTime, and the push has no pTime either")
    return msgspec.structs.replace(record, ts=ts)


def _push_level(push: Mapping[str, object]) -> dict[str, object]:
    """eventType / curPage / lastPage of an account or positions push, checked."""
    out: dict[str, object] = {}
    event_type = push.get("eventType", _MISSING)
    if event_type is not _MISSING:
        out["event_type"] = _check(S, "eventType", event_type, False)
    cur_page = push.get("curPage", _MISSING)
    if cur_page is not _MISSING:
        out["cur_page"] = _check(L, "curPage", cur_page, False)
    last_page = push.get("lastPage", _MISSING)
    if last_page is not _MISSING:
        out["last_page"] = _check(B, "lastPage", last_page, False)
    return out


_BAP_ROW = frozenset({"pTime", "eventType", "balData", "posData", "trades"})


def _balance_and_position(row: object, ctx: _Ctx, start: int) -> list[OkxRecord]:
    """One balance_and_position row -> a Balance per balData entry and a Position per posData entry."""
    if type(row) is not dict:
        _wrong_type("", row, "an object")
    more: dict[str, object] = {}
    if "pTime" in row:
        more["p_time"] = _check(I, "pTime", row["pTime"], False)
    if "eventType" in row:
        more["event_type"] = _check(S, "eventType", row["eventType"], False)
    if "trades" in row:
        more["trades"] = _check(J, "trades", row["trades"], False)
    parent_extra = _extras(row, _BAP_ROW, "parent.")
    out: list[OkxRecord] = []
    for key in ("balData", "posData"):
        entries = row.get(key, [])
        if type(entries) is not list:
            _wrong_type(key, entries, "an array")
        for i, entry in enumerate(entries):
            try:
                if key == "balData":
                    if type(entry) is not dict:
                        _wrong_type("", entry, "an object")
                    out.append(_balance(entry, ctx, start + len(out), more, parent_extra))
                else:
                    out.append(_POSITION.build(entry, ctx.common(start + len(out)), ctx,
                                               more={"uid": ctx.uid, **more}, parent_extra=parent_extra))
            except _Invalid as exc:
                raise exc.under(f"{key}[{i}]") from None
    return out


RowHandler = Callable[[object, _Ctx, int, Mapping[str, object]], list[OkxRecord]]


def _generic(spec: _Spec, *, private: bool = False, push_level: bool = False) -> RowHandler:
    def handle(row: object, ctx: _Ctx, start: int, push: Mapping[str, object]) -> list[OkxRecord]:
        more: dict[str, object] = _push_level(push) if push_level else {}
        if private:
            more["uid"] = ctx.uid
        return [spec.build(row, ctx.common(start), ctx, more=more)]
    return handle


def _account_handler(row: object, ctx: _Ctx, start: int, push: Mapping[str, object]) -> list[OkxRecord]:
    return _account(row, ctx, start, _push_level(push))


_ROW_HANDLERS: dict[str, RowHandler] = {
    "tickers": _generic(_TICKER),
    "mark-price": _generic(_MARK_PRICE),
    "index-tickers": _generic(_INDEX_TICKER),
    "funding-rate": _generic(_FUNDING_RATE),
    "open-interest": _generic(_OPEN_INTEREST),
    "price-limit": _generic(_PRICE_LIMIT),
    "instruments": _generic(_INSTRUMENT),
    "liquidation-orders": lambda row, ctx, start, push: _liquidations(row, ctx, start),
    "orders": _generic(_ORDER, private=True),
    "fills": _generic(_FILL, private=True),
    "orders-algo": _generic(_ALGO_ORDER, private=True),
    "positions": _generic(_POSITION, private=True, push_level=True),
    "account": _account_handler,
    "balance_and_position": lambda row, ctx, start, push: _balance_and_position(row, ctx, start),
}
#: Channels whose rows belong to several instruments: arg.instId (if any) only filters, so rows may differ.
_MULTI_INSTRUMENT = frozenset({"orders", "fills", "orders-algo", "positions", "balance_and_position", "account",
                               "liquidation-orders", "instruments"})
_TRADE_CHANNELS = frozenset({"trades", "trades-all"})
_PUSH_KEYS = frozenset({"arg", "data", "id"})
_PUSH_KEYS_BY_CHANNEL: dict[str, frozenset[str]] = {
    **{c: _PUSH_KEYS | {"action"} for c in BOOK_CHANNELS},
    "account": _PUSH_KEYS | {"eventType", "curPage", "lastPage"},
    "positions": _PUSH_KEYS | {"eventType", "curPage", "lastPage"},
}
_ARG_KEYS = frozenset({"channel", "instId", "instType", "instFamily", "ccy", "extraParams", "uid"})


def supports(channel: str) -> bool:
    """True when `normalize` turns pushes of `channel` into records (others are dead-lettered)."""
    return (channel in _ROW_HANDLERS or channel in _TRADE_CHANNELS or channel in BOOK_CHANNELS
            or candle_bar(channel) is not None)



_DECODER = msgspec.json.Decoder(float_hook=Decimal)
# SubArg is a frozen dataclass (slow to build); pushes of one stream repeat the same arg, so share instances.
_SUBARG_CACHE: dict[tuple[str | None, ...], SubArg] = {}
_SUBARG_KEYS = ("channel", "instId", "instType", "instFamily", "ccy", "extraParams")



def _normalize(frame: InboundFrame) -> Normalized:
    """The reference path for every frame (and the fallback of the fast paths)."""
    try:
        msg = _DECODER.decode(frame.data)
    except UnicodeDecodeError as exc:
        return _dead(frame, DeadLetterReason.NOT_UTF8, f"frame is not UTF-8: {exc}")
    except (msgspec.DecodeError, RecursionError) as exc:
        try:  # the parser stops at the first bad byte, which may be a bad UTF-8 sequence
            frame.data.decode()
        except UnicodeDecodeError as utf8:
            return _dead(frame, DeadLetterReason.NOT_UTF8, f"frame is not UTF-8: {utf8}")
        return _dead(frame, DeadLetterReason.BAD_JSON, f"frame is not JSON: {exc}")
    if type(msg) is not dict:
        return _dead(frame, DeadLetterReason.NOT_OBJECT, f"frame is {_type_name(msg)}, not a JSON object")
    if "event" in msg:
        return _event(frame, msg)
    arg = msg.get("arg")
    if type(arg) is not dict or "data" not in msg:
        if "arg" not in msg:
            return _dead(frame, DeadLetterReason.UNRECOGNIZED, "frame has neither event nor arg+data")
        if type(arg) is not dict:
            return _dead(frame, DeadLetterReason.WRONG_TYPE, f"expected an object, got {_type_name(arg)}", "arg")
        return _dead(frame, DeadLetterReason.MISSING_FIELD, "a push without data", "data")
    channel = arg.get("channel")
    if type(channel) is not str:
        code = DeadLetterReason.MISSING_FIELD if channel is None else DeadLetterReason.WRONG_TYPE
        return _dead(frame, code, "arg.channel must be a string", "arg.channel")
    inst_id = arg.get("instId")
    inst_id = inst_id if type(inst_id) is str else None
    if not supports(channel):
        if endpoint_for(channel) is not None:
            return _dead(frame, DeadLetterReason.UNSUPPORTED_CHANNEL, f"no record type for channel {channel!r}",
                         "arg.channel", channel, inst_id)
        return _dead(frame, DeadLetterReason.UNKNOWN_CHANNEL, f"unknown channel {channel!r}", "arg.channel",
                     channel, inst_id)
    try:
        return _push(frame, msg, arg, channel)
    except _Invalid as exc:
        return _dead(frame, exc.code, exc.reason, exc.path or None, channel, inst_id)


def _sub_arg(arg: dict[str, object]) -> SubArg:
    """SubArg.from_okx, memoised on the string values it reads."""
    return _cached_sub_arg(tuple(v if type(v) is str else None for v in map(arg.get, _SUBARG_KEYS)))


def _cached_sub_arg(key: tuple[str | None, ...]) -> SubArg:
    sub = _SUBARG_CACHE.get(key)
    if sub is None:
        channel, inst_id, inst_type, inst_family, ccy, extra_params = key
        assert channel is not None
        sub = SubArg(channel, inst_id, inst_type, inst_family, ccy, extra_params)
        if len(_SUBARG_CACHE) >= 50_000:
            _SUBARG_CACHE.clear()
        _SUBARG_CACHE[key] = sub
    return sub


def _push(frame: InboundFrame, msg: dict[str, object], arg: dict[str, object], channel: str) -> Normalized:
    extra: dict[str, str] = {}
    for key, value in arg.items():
        if key in _ARG_KEYS:
            if type(value) is not str:
                _wrong_type(f"arg.{key}", value, "a string")
        else:
            extra[f"arg.{key}"] = _json_text(value)
    if len(msg) != 2:
        extra.update(_extras(msg, _PUSH_KEYS_BY_CHANNEL.get(channel, _PUSH_KEYS), "push."))
    rows = msg["data"]
    if type(rows) is not list:
        _wrong_type("data", rows, "an array")
    sub = _sub_arg(arg)
    uid = arg.get("uid")
    ctx = _Ctx(channel=channel, conn=frame.conn, recv_seq=frame.recv_seq, recv_ts_ns=frame.recv_ts_ns,
               source=Source.WS, rid_prefix=f"{frame.conn}:{frame.recv_seq}:", inst_id=sub.inst_id,
               inst_type=sub.inst_type, uid=uid if type(uid) is str else None, extra=extra,
               check_inst_id=channel not in _MULTI_INSTRUMENT)
    if channel in _TRADE_CHANNELS:
        trades: list[Trade] = []
        refs: list[TradeRef] = []
        for i, row in enumerate(rows):
            try:
                record, ref = _trade(row, ctx, i)
            except _Invalid as exc:
                raise exc.under(f"data[{i}]") from None
            trades.append(record)
            refs.append(ref)
        return TradePush(arg=sub, records=tuple(trades), refs=tuple(refs))
    if channel in BOOK_CHANNELS:
        action = _book_action(msg, channel)
        books: list[BookUpdate] = []
        for i, row in enumerate(rows):
            try:
                books.append(_book(row, ctx, i, action))
            except _Invalid as exc:
                raise exc.under(f"data[{i}]") from None
        return BookPush(arg=sub, records=tuple(books))
    records: list[OkxRecord] = []
    handler = _ROW_HANDLERS.get(channel)
    for i, row in enumerate(rows):
        try:
            if handler is None:
                records.append(_candle(row, ctx, len(records)))
            else:
                records.extend(handler(row, ctx, len(records), msg))
        except _Invalid as exc:
            raise exc.under(f"data[{i}]") from None
    return RecordPush(arg=sub, records=tuple(records))


def _book_action(msg: Mapping[str, object], channel: str) -> BookAction:
    action = msg.get("action", _MISSING)
    if action is _MISSING:
        if channel in SNAPSHOT_BOOK_CHANNELS:
            return BookAction.SNAPSHOT
        _missing("action")
    if action == "snapshot":
        return BookAction.SNAPSHOT
    if action == "update":
        return BookAction.UPDATE
    if type(action) is str:
        raise _Invalid(DeadLetterReason.BAD_VALUE, "action", f"{_show(action)} is not snapshot or update")
    _wrong_type("action", action, "a string")


def _event(frame: InboundFrame, msg: dict[str, object]) -> OkxEvent | DeadLetter:
    """An event frame. OKX sends codes and counts as strings; numbers are accepted too, since losing a login
    error to a type quibble would be worse than reading "60009" from 60009."""
    try:
        event = msg["event"]
        if type(event) is not str:
            _wrong_type("event", event, "a string")
        text: dict[str, str | None] = {}
        for key in ("code", "msg", "connId", "id", "channel", "connCount"):
            value = msg.get(key)
            if value is None or type(value) is str:
                text[key] = value
            elif type(value) is int:
                text[key] = str(value)
            else:
                _wrong_type(key, value, "a string")
        arg = msg.get("arg")
        sub = None
        if arg is not None:
            if type(arg) is not dict or type(arg.get("channel")) is not str:
                _wrong_type("arg", arg, "an object with a channel")
            sub = _sub_arg(arg)
    except _Invalid as exc:
        return _dead(frame, exc.code, exc.reason, exc.path)
    return OkxEvent(event=event, code=text["code"], msg=text["msg"], okx_conn_id=text["connId"],
                    request_id=text["id"], arg=sub, channel=text["channel"] or (sub.channel if sub else None),
                    conn_count=text["connCount"], conn=frame.conn, recv_seq=frame.recv_seq,
                    recv_ts_ns=frame.recv_ts_ns)


def _dead(frame: InboundFrame, code: DeadLetterReason, reason: str, path: str | None = None,
          channel: str | None = None, inst_id: str | None = None) -> DeadLetter:
    if path and not reason.startswith(path):
        reason = f"{path}: {reason}"
    return DeadLetter(reason_code=code, reason=reason, path=path, raw=frame.data, source=Source.WS,
                      conn_id=frame.conn, name=frame.name, endpoint=str(frame.endpoint), recv_seq=frame.recv_seq,
                      recv_ts_ns=frame.recv_ts_ns, channel=channel, inst_id=inst_id,
                      record_id=f"{frame.conn}:{frame.recv_seq}:dlq")


def push_arg(data: bytes) -> SubArg | None:
    """The subscription arg of a push frame when it can be read (None otherwise): which stream a dead letter
    belongs to. Only called for dead letters, so it parses again rather than burden the normal path."""
    try:
        msg = _DECODER.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    arg = msg.get("arg") if type(msg) is dict and "data" in msg else None
    if type(arg) is not dict or type(arg.get("channel")) is not str:
        return None
    return _sub_arg(arg)


def frame_dead_letter(frame: InboundFrame, code: DeadLetterReason, reason: str, *, channel: str | None = None,
                      inst_id: str | None = None) -> DeadLetter:
    """The dead letter of a frame that normalized but that the pipeline refuses (e.g. an unsubscribed arg)."""
    return _dead(frame, code, reason, None, channel, inst_id)

