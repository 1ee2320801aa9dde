"""Public push frames, rendered once per step and shared by every subscriber of the same arg.

Shapes and key order follow the recorded frames (`shared/okx/frames/`): every number is a string except
`seqId`/`prevSeqId`/`checksum` (integers) and `enabled`/`futureSettlement` (booleans). Trade frames are
formatted with f-strings because the benchmark pushes tens of thousands of them per second; instrument ids
only contain `[A-Z0-9-]`, so no escaping is needed.
"""

from __future__ import annotations

import orjson

from ingest.sim.book import Level, okx_checksum
from ingest.sim.market import AggTrade, InstrumentMarket, Liquidation
from ingest.sim.numbers import dstr, fmt_trim, units_to_decimal

Json = dict[str, object]


def dumps(obj: object) -> str:
    return orjson.dumps(obj).decode()


def push(channel: str, inst_id: str, data: list[object], **extra: object) -> str:
    """`{"arg":{"channel":…,"instId":…}, …extra, "data":[…]}`."""
    msg: Json = {"arg": {"channel": channel, "instId": inst_id}, **extra, "data": data}
    return dumps(msg)


def level_rows(m: InstrumentMarket, levels: list[Level]) -> list[list[str]]:
    """Levels as OKX sends them: [px, sz, "0" (deprecated), orders]; a deletion is [px, "0", "0", "0"]."""
    ps, ss = m.px_str, m.sz_str
    return [[ps(px), ss(sz), "0", str(cnt)] for px, sz, cnt in levels]


def sorted_delta(delta: dict[int, tuple[int, int]], is_bid: bool) -> list[Level]:
    return [(px, sz, cnt) for px, (sz, cnt) in sorted(delta.items(), reverse=is_bid)]


def checksum_of(m: InstrumentMarket) -> int:
    """CRC32 of the current book's top 25 per side, over the exact strings that were pushed."""
    return okx_checksum(level_rows(m, m.book.top(True, 25)), level_rows(m, m.book.top(False, 25)))


def book_snapshot(m: InstrumentMarket, channel: str, depth: int, ts: int, checksum: int) -> str:
    book = m.book
    data: Json = {"asks": level_rows(m, book.top(False, depth)), "bids": level_rows(m, book.top(True, depth)),
                  "ts": str(ts), "checksum": checksum, "prevSeqId": -1, "seqId": m.book_seq}
    return dumps({"arg": {"channel": channel, "instId": m.spec.inst_id}, "action": "snapshot", "data": [data]})


def book_update(channel: str, inst_id: str, asks: list[list[str]], bids: list[list[str]], ts: int, checksum: int,
                prev_seq: int, seq: int) -> str:
    data: Json = {"asks": asks, "bids": bids, "ts": str(ts), "checksum": checksum, "prevSeqId": prev_seq,
                  "seqId": seq}
    return dumps({"arg": {"channel": channel, "instId": inst_id}, "action": "update", "data": [data]})


def books5(m: InstrumentMarket, ts: int) -> str:
    book = m.book
    data: Json = {"asks": level_rows(m, book.top(False, 5)), "bids": level_rows(m, book.top(True, 5)),
                  "instId": m.spec.inst_id, "ts": str(ts), "seqId": m.book_seq}
    return push("books5", m.spec.inst_id, [data])


def bbo(m: InstrumentMarket, ts: int) -> str:
    book = m.book
    data: Json = {"asks": level_rows(m, book.top(False, 1)), "bids": level_rows(m, book.top(True, 1)),
                  "ts": str(ts), "seqId": m.book_seq}
    return push("bbo-tbt", m.spec.inst_id, [data])


def top_key(m: InstrumentMarket, n: int) -> tuple[Level, ...]:
    """What books5/bbo-tbt show: they push only when this changes (or as a heartbeat)."""
    return (*m.book.top(True, n), *m.book.top(False, n))


def trades(m: InstrumentMarket, rows: list[AggTrade]) -> list[str]:
    inst = m.spec.inst_id
    ps, ss = m.px_str, m.sz_str
    return [
        f'{{"arg":{{"channel":"trades","instId":"{inst}"}},"data":[{{"instId":"{inst}","tradeId":"{t.trade_id}",'
        f'"px":"{ps(t.px)}","sz":"{ss(t.sz)}","side":"{"buy" if t.buy else "sell"}","ts":"{t.ts}",'
        f'"count":"{t.count}","source":"{t.source}","seqId":{t.seq_id}}}]}}'
        for t in rows
    ]


def trades_all(m: InstrumentMarket, lo: int, hi: int) -> list[str]:
    """One `trades-all` message per individual trade of log indexes [lo, hi)."""
    inst = m.spec.inst_id
    log = m.log
    ps, ss = m.px_str, m.sz_str
    return [
        f'{{"arg":{{"channel":"trades-all","instId":"{inst}"}},"data":[{{"instId":"{inst}",'
        f'"tradeId":"{log.ids[i]}","px":"{ps(log.px[i])}","sz":"{ss(log.sz[i])}",'
        f'"side":"{"buy" if log.sides[i] else "sell"}","source":"{log.sources[i]}","ts":"{log.ts[i]}"}}]}}'
        for i in range(lo, hi)
    ]


def ticker(m: InstrumentMarket, ts: int) -> str:
    spec = m.spec
    bid, ask = m.book.top(True, 1), m.book.top(False, 1)
    deriv = spec.is_derivative
    vol_units, quote_units = m.vol24h, m.quote24h
    if deriv:
        coin = units_to_decimal(vol_units, m.sz_dec) * m.ct_val
        if spec.is_inverse:
            coin = coin / max(units_to_decimal(m.last_px, m.px_dec), units_to_decimal(m.tick, m.px_dec))
        vol_ccy = dstr(coin, 8)
    else:
        vol_ccy = fmt_trim(quote_units, m.px_dec + m.sz_dec)
    data: Json = {
        "instType": spec.inst_type, "instId": spec.inst_id, "last": m.px_str(m.last_px), "lastSz": m.sz_str(m.last_sz),
        "askPx": m.px_str(ask[0][0]) if ask else "", "askSz": m.sz_str(ask[0][1]) if ask else "",
        "bidPx": m.px_str(bid[0][0]) if bid else "", "bidSz": m.sz_str(bid[0][1]) if bid else "",
        "open24h": m.px_str(m.open24h), "high24h": m.px_str(m.high24h), "low24h": m.px_str(m.low24h),
        "sodUtc0": m.px_str(m.open24h), "sodUtc8": m.px_str(m.open24h), "volCcy24h": vol_ccy,
        "vol24h": m.sz_str(vol_units), "ts": str(ts),
    }
    return push("tickers", spec.inst_id, [data])


def mark_price(m: InstrumentMarket, ts: int) -> str:
    data: Json = {"instType": m.spec.inst_type, "instId": m.spec.inst_id, "markPx": m.px_str(m.mark_px()),
                  "ts": str(ts)}
    return push("mark-price", m.spec.inst_id, [data])


def index_ticker(index_id: str, m: InstrumentMarket, ts: int) -> str:
    px = m.px_str
    data: Json = {"instId": index_id, "idxPx": px(m.index_px()), "high24h": px(m.high24h), "low24h": px(m.low24h),
                  "open24h": px(m.open24h), "sodUtc0": px(m.open24h), "sodUtc8": px(m.open24h), "ts": str(ts)}
    return push("index-tickers", index_id, [data])


def funding_rate(m: InstrumentMarket, ts: int) -> str:
    rate, premium, funding_time, next_time = m.funding(ts)
    data: Json = {
        "formulaType": "withRate", "fundingRate": rate, "fundingTime": funding_time, "impactValue": "",
        "instId": m.spec.inst_id, "instType": m.spec.inst_type, "interestRate": "0.0001", "method": "current_period",
        "maxFundingRate": "0.00375", "minFundingRate": "-0.00375", "nextFundingRate": "",
        "nextFundingTime": next_time, "premium": premium, "settFundingRate": rate, "settState": "settled",
        "ts": str(ts),
    }
    return push("funding-rate", m.spec.inst_id, [data])


def open_interest(m: InstrumentMarket, ts: int) -> str:
    oi, coin, usd = m.open_interest()
    data: Json = {"instId": m.spec.inst_id, "instType": m.spec.inst_type, "oi": oi, "oiCcy": coin, "oiUsd": usd,
                  "ts": str(ts)}
    return push("open-interest", m.spec.inst_id, [data])


def price_limit(m: InstrumentMarket, ts: int) -> str:
    buy, sell = m.price_limits()
    data: Json = {"instType": m.spec.inst_type, "instId": m.spec.inst_id, "buyLmt": buy, "sellLmt": sell,
                  "ts": str(ts), "enabled": True}
    return push("price-limit", m.spec.inst_id, [data])


def liquidation(m: InstrumentMarket, liq: Liquidation) -> str:
    spec = m.spec
    detail: Json = {"bkLoss": "0", "bkPx": m.px_str(liq.bk_px), "ccy": "", "posSide": liq.pos_side,
                    "side": liq.side, "sz": m.sz_str(liq.sz), "ts": str(liq.ts)}
    data: Json = {"details": [detail], "instFamily": spec.inst_family, "instId": spec.inst_id,
                  "instType": spec.inst_type, "uly": spec.inst_family}
    return dumps({"arg": {"channel": "liquidation-orders", "instType": spec.inst_type}, "data": [data]})


def instrument(m: InstrumentMarket) -> str:
    return dumps({"arg": {"channel": "instruments", "instType": m.spec.inst_type}, "data": [m.spec.to_okx()]})


def candle(channel: str, inst_id: str, row: list[str]) -> str:
    return push(channel, inst_id, [row])
