"""The record contract in Python: one frozen msgspec Struct per record, the one source of `schemas/*.avsc`.

Field order, types, nullability and defaults here are the Avro schema's: `core/contract.py` generates the
.avsc files from these Structs and the docs in `core/record_docs.py` (`make schemas`; tests/unit/test_records.py
fails while a committed file differs). Attributes are snake_case; their msgspec encode names are the camelCase
Avro field names, which are OKX's own names wherever a field comes from OKX. Every record knows its
Avro full name (`AVRO_NAME`), its topic kind (`TOPIC`), its Kafka key and the `record_id` header value, so the
encoder needs nothing but the record. Decimals are the strings OKX sent: see docs/RECORDS.md for why.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, ClassVar

import msgspec

NAMESPACE = "okx.ingest.v1"


class TopicKind(enum.StrEnum):
    """What a topic holds; the value is the suffix after the configurable prefix (`okx.` + `trades`)."""

    TRADES = "trades"
    BOOKS = "books"
    TICKERS = "tickers"
    CANDLES = "candles"
    MARK_PRICES = "mark_prices"
    INDEX_TICKERS = "index_tickers"
    FUNDING_RATES = "funding_rates"
    OPEN_INTEREST = "open_interest"
    LIQUIDATIONS = "liquidations"
    PRICE_LIMITS = "price_limits"
    INSTRUMENTS = "instruments"
    ORDERS = "orders"
    FILLS = "fills"
    POSITIONS = "positions"
    BALANCES = "balances"
    ALGO_ORDERS = "algo_orders"
    GAPS = "gaps"
    DLQ = "dlq"
    RAW = "raw"


def topic_name(prefix: str, kind: TopicKind) -> str:
    """The full topic name: `topic_name("okx.", TopicKind.TRADES) == "okx.trades"`."""
    return f"{prefix}{kind.value}"


class Source(enum.StrEnum):
    """Where a record came from (Avro enum `Source`)."""

    WS = "ws"
    REST = "rest"


class BookAction(enum.StrEnum):
    """Avro enum `BookAction`: a snapshot replaces the book, an update applies levels to it, a checkpoint is the
    recorder's copy of its verified book that replaces it without breaking the seqId chain."""

    SNAPSHOT = "snapshot"
    UPDATE = "update"
    CHECKPOINT = "checkpoint"


class GapKind(enum.StrEnum):
    """Avro enum `GapKind`: why data of one stream may be missing."""

    DISCONNECT = "disconnect"
    SEQ_BREAK = "seq_break"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    TRADE_HOLE = "trade_hole"
    SUBSCRIBE_FAILED = "subscribe_failed"
    RESET = "reset"
    CUTOVER = "cutover"
    DEAD_LETTER = "dead_letter"
    OTHER = "other"


class GapStatus(enum.StrEnum):
    """Avro enum `GapStatus`: how far the backfill worker got."""

    OPEN = "open"
    FILLED = "filled"
    PARTIAL = "partial"
    UNFILLABLE = "unfillable"


class DeadLetterReason(enum.StrEnum):
    """Avro enum `DeadLetterReason`: why a message could not become records."""

    NOT_UTF8 = "not_utf8"
    BAD_JSON = "bad_json"
    NOT_OBJECT = "not_object"
    UNRECOGNIZED = "unrecognized"
    UNKNOWN_CHANNEL = "unknown_channel"
    UNSUPPORTED_CHANNEL = "unsupported_channel"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    BAD_NUMBER = "bad_number"
    BAD_VALUE = "bad_value"
    INTERNAL_ERROR = "internal_error"
    OTHER = "other"
    #: A push for an arg this shard never subscribed: kept as a dead letter, never given per-stream state.
    UNSUBSCRIBED = "unsubscribed"


#: One book level exactly as OKX sends it: [px, sz, deprecated "0", numOrders].
BookLevel = tuple[str, str, str, str]

# OKX names whose capitals do not follow the snake_case -> camelCase rule.
_AVRO_NAME_OVERRIDES = {
    "delta_bs": "deltaBS", "delta_pa": "deltaPA", "gamma_bs": "gammaBS", "gamma_pa": "gammaPA",
    "theta_bs": "thetaBS", "theta_pa": "thetaPA", "vega_bs": "vegaBS", "vega_pa": "vegaPA",
}


def avro_field_name(attr: str) -> str:
    """The Avro (and OKX) name of a Struct attribute: `inst_id` -> `instId`, `vol_ccy24h` -> `volCcy24h`."""
    override = _AVRO_NAME_OVERRIDES.get(attr)
    if override is not None:
        return override
    head, *rest = attr.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


class Record(msgspec.Struct, frozen=True, kw_only=True, rename=avro_field_name, gc=False):
    """Base of every top-level Avro record: its schema, topic, Kafka key, timestamp and record_id header.

    `gc=False`: records hold only strings, numbers and containers of them, so they can never be part of a
    reference cycle, and skipping GC tracking saves work on the hot path.
    """

    AVRO_NAME: ClassVar[str]
    TOPIC: ClassVar[TopicKind]

    def kafka_key(self) -> bytes | None:
        """The Kafka key: keeps what must stay ordered in one partition."""
        raise NotImplementedError

    def kafka_ts_ms(self) -> int:
        """The Kafka message timestamp, epoch milliseconds."""
        raise NotImplementedError

    def emission_id(self) -> str:
        """The `record_id` header: equal for duplicates of one emission, different for distinct emissions."""
        raise NotImplementedError

    def source_header(self) -> str:
        """The `source` header: ws, rest, or ingest for records the daemon makes itself (gaps)."""
        raise NotImplementedError


class OkxRecord(Record, frozen=True, kw_only=True):
    """The common fields of every market and private record (docs/ARCHITECTURE.md, "records")."""

    exchange: str = "okx"
    channel: str
    inst_id: str | None
    inst_type: str | None = None
    ts: int
    recv_ts_ns: int
    source: Source
    conn_id: str | None = None
    recv_seq: int | None = None
    record_id: str
    if TYPE_CHECKING:
        # Every subclass declares `extra` and then `event_key` as its last fields (the Avro order); declared
        # here for type checkers only, because a field declared on the base would take the base's position.
        # `event_key` is computed by core/identity.py; the encoder fills it in when a record has none.
        extra: dict[str, str]
        event_key: str | None

    def kafka_key(self) -> bytes | None:
        return None if self.inst_id is None else self.inst_id.encode()

    def kafka_ts_ms(self) -> int:
        return self.ts

    def emission_id(self) -> str:
        return self.record_id

    def source_header(self) -> str:
        return self.source  # a StrEnum is its value; .value would be a slower property lookup


class InstrumentRecord(OkxRecord, frozen=True, kw_only=True):
    """An OKX record about one instrument: instId is never null and is the default Kafka key."""

    inst_id: str

    def kafka_key(self) -> bytes:
        return self.inst_id.encode()


class Trade(InstrumentRecord, frozen=True, kw_only=True):
    """A public trade: trades (aggregated per taker order, price and source), trades-all, or a REST trades row."""

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.Trade"
    TOPIC: ClassVar[TopicKind] = TopicKind.TRADES

    trade_id: str
    px: str
    sz: str
    side: str
    count: str | None = None
    seq_id: int | None = None
    okx_source: str | None = None
    extra: dict[str, str] = {}
    event_key: str | None = None


class BookUpdate(InstrumentRecord, frozen=True, kw_only=True):
    """One push of books, books5, bbo-tbt, books-l2-tbt or books50-l2-tbt, or a REST /market/books snapshot."""

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.BookUpdate"
    TOPIC: ClassVar[TopicKind] = TopicKind.BOOKS

    action: BookAction
    asks: tuple[BookLevel, ...]
    bids: tuple[BookLevel, ...]
    seq_id: int | None = None
    prev_seq_id: int | None = None
    checksum: int | None = None
    extra: dict[str, str] = {}
    event_key: str | None = None


class Ticker(InstrumentRecord, frozen=True, kw_only=True):
    """A tickers push: last trade, best bid/ask and 24h statistics."""

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.Ticker"
    TOPIC: ClassVar[TopicKind] = TopicKind.TICKERS

    last: str | None = None
    last_sz: str | None = None
    ask_px: str | None = None
    ask_sz: str | None = None
    bid_px: str | None = None
    bid_sz: str | None = None
    open24h: str | None = None
    high24h: str | None = None
    low24h: str | None = None
    vol_ccy24h: str | None = None
    vol24h: str | None = None
    sod_utc0: str | None = None
    sod_utc8: str | None = None
    extra: dict[str, str] = {}
    event_key: str | None = None


class Candle(InstrumentRecord, frozen=True, kw_only=True):
    """One candlestick of candle<bar>, mark-price-candle<bar> or index-candle<bar>, or a REST candles row."""

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.Candle"
    TOPIC: ClassVar[TopicKind] = TopicKind.CANDLES

    bar: str
    o: str
    h: str
    l: str  # noqa: E741 - the OKX and Avro name of the low price
    c: str
    vol: str | None = None
    vol_ccy: str | None = None
    vol_ccy_quote: str | None = None
    confirm: bool | None = None
    extra: dict[str, str] = {}
    event_key: str | None = None


class MarkPrice(InstrumentRecord, frozen=True, kw_only=True):
    """A mark-price push."""

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.MarkPrice"
    TOPIC: ClassVar[TopicKind] = TopicKind.MARK_PRICES

    mark_px: str
    extra: dict[str, str] = {}
    event_key: str | None = None


class IndexTicker(InstrumentRecord, frozen=True, kw_only=True):
    """An index-tickers push (instId is an index such as BTC-USDT)."""

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.IndexTicker"
    TOPIC: ClassVar[TopicKind] = TopicKind.INDEX_TICKERS

    idx_px: str
    open24h: str | None = None
    high24h: str | None = None
    low24h: str | None = None
    sod_utc0: str | None = None
    sod_utc8: str | None = None
    extra: dict[str, str] = {}
    event_key: str | None = None


class FundingRate(InstrumentRecord, frozen=True, kw_only=True):
    """A funding-rate push of a SWAP."""

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.FundingRate"
    TOPIC: ClassVar[TopicKind] = TopicKind.FUNDING_RATES

    method: str | None = None
    formula_type: str | None = None
    funding_rate: str | None = None
    next_funding_rate: str | None = None
    funding_time: str | None = None
    next_funding_time: str | None = None
    min_funding_rate: str | None = None
    max_funding_rate: str | None = None
    interest_rate: str | None = None
    impact_value: str | None = None
    premium: str | None = None
    sett_state: str | None = None
    sett_funding_rate: str | None = None
    extra: dict[str, str] = {}
    event_key: str | None = None


class OpenInterest(InstrumentRecord, frozen=True, kw_only=True):
    """An open-interest push."""

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.OpenInterest"
    TOPIC: ClassVar[TopicKind] = TopicKind.OPEN_INTEREST

    oi: str
    oi_ccy: str | None = None
    oi_usd: str | None = None
    extra: dict[str, str] = {}
    event_key: str | None = None


class Liquidation(InstrumentRecord, frozen=True, kw_only=True):
    """One liquidation order: each detail of a liquidation-orders row becomes one record (with the row's instId)."""

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.Liquidation"
    TOPIC: ClassVar[TopicKind] = TopicKind.LIQUIDATIONS

    inst_family: str | None = None
    uly: str | None = None
    side: str
    pos_side: str | None = None
    bk_px: str
    sz: str
    bk_loss: str | None = None
    ccy: str | None = None
    extra: dict[str, str] = {}
    event_key: str | None = None


class PriceLimit(InstrumentRecord, frozen=True, kw_only=True):
    """A price-limit push: the highest buy and lowest sell price allowed."""

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.PriceLimit"
    TOPIC: ClassVar[TopicKind] = TopicKind.PRICE_LIMITS

    buy_lmt: str | None = None
    sell_lmt: str | None = None
    enabled: bool | None = None
    extra: dict[str, str] = {}
    event_key: str | None = None


class Instrument(InstrumentRecord, frozen=True, kw_only=True):
    """An instrument definition from the instruments channel (changes only) or GET /api/v5/public/instruments."""

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.Instrument"
    TOPIC: ClassVar[TopicKind] = TopicKind.INSTRUMENTS

    series_id: str | None = None
    uly: str | None = None
    group_id: str | None = None
    inst_family: str | None = None
    category: str | None = None
    inst_category: str | None = None
    base_ccy: str | None = None
    quote_ccy: str | None = None
    settle_ccy: str | None = None
    ct_val: str | None = None
    ct_mult: str | None = None
    ct_val_ccy: str | None = None
    opt_type: str | None = None
    stk: str | None = None
    list_time: str | None = None
    auction_end_time: str | None = None
    cont_td_sw_time: str | None = None
    pre_mkt_sw_time: str | None = None
    open_type: str | None = None
    exp_time: str | None = None
    lever: str | None = None
    tick_sz: str | None = None
    lot_sz: str | None = None
    min_sz: str | None = None
    ct_type: str | None = None
    alias: str | None = None
    state: str | None = None
    rule_type: str | None = None
    max_lmt_sz: str | None = None
    max_mkt_sz: str | None = None
    max_lmt_amt: str | None = None
    max_mkt_amt: str | None = None
    max_twap_sz: str | None = None
    max_iceberg_sz: str | None = None
    max_trigger_sz: str | None = None
    max_stop_sz: str | None = None
    future_settlement: bool | None = None
    trade_quote_ccy_list: str | None = None
    inst_id_code: int | None = None
    init_px_lmt_pct: str | None = None
    float_px_lmt_pct: str | None = None
    max_px_lmt_pct: str | None = None
    rpi_min_level: str | None = None
    rpi_min_px_band: str | None = None
    upc_chg: str | None = None
    extra: dict[str, str] = {}
    event_key: str | None = None


class Order(InstrumentRecord, frozen=True, kw_only=True):
    """One update of one of our orders (orders channel), or a REST orders-history row (fill* = the last fill)."""

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.Order"
    TOPIC: ClassVar[TopicKind] = TopicKind.ORDERS

    uid: str | None = None
    ord_id: str
    cl_ord_id: str | None = None
    tag: str | None = None
    tgt_ccy: str | None = None
    ccy: str | None = None
    px: str | None = None
    px_usd: str | None = None
    px_vol: str | None = None
    px_type: str | None = None
    sz: str | None = None
    notional_usd: str | None = None
    ord_type: str | None = None
    side: str | None = None
    pos_side: str | None = None
    td_mode: str | None = None
    fill_px: str | None = None
    trade_id: str | None = None
    fill_sz: str | None = None
    fill_pnl: str | None = None
    fill_time: str | None = None
    fill_fee: str | None = None
    fill_fee_ccy: str | None = None
    fill_px_vol: str | None = None
    fill_px_usd: str | None = None
    fill_mark_vol: str | None = None
    fill_fwd_px: str | None = None
    fill_mark_px: str | None = None
    fill_idx_px: str | None = None
    exec_type: str | None = None
    acc_fill_sz: str | None = None
    fill_notional_usd: str | None = None
    avg_px: str | None = None
    state: str | None = None
    lever: str | None = None
    attach_algo_cl_ord_id: str | None = None
    tp_trigger_px: str | None = None
    tp_trigger_px_type: str | None = None
    tp_ord_px: str | None = None
    sl_trigger_px: str | None = None
    sl_trigger_px_type: str | None = None
    sl_ord_px: str | None = None
    attach_algo_ords: str | None = None
    linked_algo_ord: str | None = None
    stp_id: str | None = None
    stp_mode: str | None = None
    fee_ccy: str | None = None
    fee: str | None = None
    rebate_ccy: str | None = None
    rebate: str | None = None
    pnl: str | None = None
    okx_source: str | None = None
    cancel_source: str | None = None
    cancel_source_reason: str | None = None
    amend_source: str | None = None
    category: str | None = None
    is_tp_limit: str | None = None
    u_time: str
    c_time: str | None = None
    req_id: str | None = None
    amend_result: str | None = None
    reduce_only: str | None = None
    quick_mgn_type: str | None = None
    algo_cl_ord_id: str | None = None
    algo_id: str | None = None
    last_px: str | None = None
    code: str | None = None
    msg: str | None = None
    trade_quote_ccy: str | None = None
    extra: dict[str, str] = {}
    event_key: str | None = None

    def kafka_key(self) -> bytes:
        return self.ord_id.encode()


class Fill(InstrumentRecord, frozen=True, kw_only=True):
    """One of our fills from the fills channel (order-book fills only) or a REST fills / fills-history row."""

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.Fill"
    TOPIC: ClassVar[TopicKind] = TopicKind.FILLS

    uid: str | None = None
    trade_id: str
    ord_id: str
    cl_ord_id: str | None = None
    bill_id: str | None = None
    sub_type: str | None = None
    tag: str | None = None
    fill_px: str
    fill_sz: str
    fill_idx_px: str | None = None
    fill_pnl: str | None = None
    fill_px_vol: str | None = None
    fill_px_usd: str | None = None
    fill_mark_vol: str | None = None
    fill_fwd_px: str | None = None
    fill_mark_px: str | None = None
    side: str
    pos_side: str | None = None
    exec_type: str | None = None
    fee_ccy: str | None = None
    fee: str | None = None
    fee_rate: str | None = None
    fill_time: str | None = None
    count: str | None = None
    trade_quote_ccy: str | None = None
    extra: dict[str, str] = {}
    event_key: str | None = None

    def kafka_key(self) -> bytes:
        return self.ord_id.encode()


class Position(InstrumentRecord, frozen=True, kw_only=True):
    """One position: positions channel, a balance_and_position row's posData, or a REST positions row."""

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.Position"
    TOPIC: ClassVar[TopicKind] = TopicKind.POSITIONS

    uid: str | None = None
    event_type: str | None = None
    cur_page: int | None = None
    last_page: bool | None = None
    p_time: str | None = None
    trades: str | None = None
    pos_id: str | None = None
    mgn_mode: str | None = None
    pos_side: str | None = None
    pos: str | None = None
    pos_ccy: str | None = None
    avail_pos: str | None = None
    avg_px: str | None = None
    non_settle_avg_px: str | None = None
    settled_pnl: str | None = None
    upl: str | None = None
    upl_ratio: str | None = None
    upl_last_px: str | None = None
    upl_ratio_last_px: str | None = None
    lever: str | None = None
    liq_px: str | None = None
    mark_px: str | None = None
    imr: str | None = None
    margin: str | None = None
    mgn_ratio: str | None = None
    mmr: str | None = None
    liab: str | None = None
    liab_ccy: str | None = None
    interest: str | None = None
    trade_id: str | None = None
    notional_usd: str | None = None
    opt_val: str | None = None
    pending_close_ord_liab_val: str | None = None
    adl: str | None = None
    biz_ref_id: str | None = None
    biz_ref_type: str | None = None
    ccy: str | None = None
    last: str | None = None
    idx_px: str | None = None
    usd_px: str | None = None
    be_px: str | None = None
    delta_bs: str | None = None
    delta_pa: str | None = None
    gamma_bs: str | None = None
    gamma_pa: str | None = None
    theta_bs: str | None = None
    theta_pa: str | None = None
    vega_bs: str | None = None
    vega_pa: str | None = None
    spot_in_use_amt: str | None = None
    spot_in_use_ccy: str | None = None
    cl_spot_in_use_amt: str | None = None
    max_spot_in_use_amt: str | None = None
    realized_pnl: str | None = None
    pnl: str | None = None
    fee: str | None = None
    funding_fee: str | None = None
    liq_penalty: str | None = None
    close_order_algo: str | None = None
    base_bal: str | None = None
    base_borrowed: str | None = None
    base_interest: str | None = None
    quote_bal: str | None = None
    quote_borrowed: str | None = None
    quote_interest: str | None = None
    c_time: str | None = None
    u_time: str
    extra: dict[str, str] = {}
    event_key: str | None = None


class Balance(OkxRecord, frozen=True, kw_only=True):
    """Balances (account channel, balance_and_position balData, REST balance): a totals row or one currency."""

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.Balance"
    TOPIC: ClassVar[TopicKind] = TopicKind.BALANCES

    inst_id: str | None = None
    uid: str | None = None
    ccy: str | None = None
    event_type: str | None = None
    cur_page: int | None = None
    last_page: bool | None = None
    p_time: str | None = None
    trades: str | None = None
    u_time: str
    total_eq: str | None = None
    iso_eq: str | None = None
    adj_eq: str | None = None
    avail_eq: str | None = None
    ord_froz: str | None = None
    imr: str | None = None
    mmr: str | None = None
    borrow_froz: str | None = None
    mgn_ratio: str | None = None
    notional_usd: str | None = None
    notional_usd_for_borrow: str | None = None
    notional_usd_for_swap: str | None = None
    notional_usd_for_futures: str | None = None
    notional_usd_for_option: str | None = None
    upl: str | None = None
    eq: str | None = None
    cash_bal: str | None = None
    dis_eq: str | None = None
    fixed_bal: str | None = None
    avail_bal: str | None = None
    frozen_bal: str | None = None
    ord_frozen: str | None = None
    liab: str | None = None
    upl_liab: str | None = None
    cross_liab: str | None = None
    iso_liab: str | None = None
    reward_bal: str | None = None
    interest: str | None = None
    twap: str | None = None
    max_loan: str | None = None
    eq_usd: str | None = None
    notional_lever: str | None = None
    coin_usd_price: str | None = None
    stgy_eq: str | None = None
    iso_upl: str | None = None
    spot_in_use_amt: str | None = None
    cl_spot_in_use_amt: str | None = None
    max_spot_in_use_amt: str | None = None
    spot_iso_bal: str | None = None
    smt_sync_eq: str | None = None
    spot_copy_trading_eq: str | None = None
    spot_bal: str | None = None
    open_avg_px: str | None = None
    acc_avg_px: str | None = None
    spot_upl: str | None = None
    spot_upl_ratio: str | None = None
    total_pnl: str | None = None
    total_pnl_ratio: str | None = None
    col_res: str | None = None
    col_borr_auto_conversion: str | None = None
    collateral_restrict: bool | None = None
    collateral_enabled: bool | None = None
    auto_lend_status: str | None = None
    auto_lend_mt_amt: str | None = None
    extra: dict[str, str] = {}
    event_key: str | None = None

    def kafka_key(self) -> bytes:
        return (self.ccy or "account").encode()


class AlgoOrder(InstrumentRecord, frozen=True, kw_only=True):
    """One update of one of our algo orders from the orders-algo channel."""

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.AlgoOrder"
    TOPIC: ClassVar[TopicKind] = TopicKind.ALGO_ORDERS

    uid: str | None = None
    algo_id: str
    algo_cl_ord_id: str | None = None
    ord_id: str | None = None
    ord_id_list: str | None = None
    cl_ord_id: str | None = None
    ccy: str | None = None
    sz: str | None = None
    ord_type: str | None = None
    side: str | None = None
    pos_side: str | None = None
    td_mode: str | None = None
    tgt_ccy: str | None = None
    lever: str | None = None
    state: str | None = None
    tp_trigger_px: str | None = None
    tp_trigger_px_type: str | None = None
    tp_ord_px: str | None = None
    sl_trigger_px: str | None = None
    sl_trigger_px_type: str | None = None
    sl_ord_px: str | None = None
    trigger_px: str | None = None
    trigger_px_type: str | None = None
    ord_px: str | None = None
    last: str | None = None
    actual_sz: str | None = None
    actual_px: str | None = None
    actual_side: str | None = None
    notional_usd: str | None = None
    tag: str | None = None
    trigger_time: str | None = None
    reduce_only: str | None = None
    fail_code: str | None = None
    req_id: str | None = None
    amend_result: str | None = None
    amend_px_on_trigger_type: str | None = None
    attach_algo_ords: str | None = None
    linked_ord: str | None = None
    close_fraction: str | None = None
    quick_mgn_type: str | None = None
    is_trade_borrow_mode: str | None = None
    chase_type: str | None = None
    chase_val: str | None = None
    max_chase_type: str | None = None
    max_chase_val: str | None = None
    trade_quote_ccy: str | None = None
    c_time: str | None = None
    u_time: str
    extra: dict[str, str] = {}
    event_key: str | None = None

    def kafka_key(self) -> bytes:
        return self.algo_id.encode()


class StreamPosition(msgspec.Struct, frozen=True, kw_only=True, rename=avro_field_name, gc=False):
    """Avro record `StreamPosition` (nested in GapEvent): where one stream was, by whatever it counts in."""

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.StreamPosition"

    ts: int | None = None
    trade_id: int | None = None
    seq_id: int | None = None


class GapEvent(Record, frozen=True, kw_only=True):
    """A stretch of one stream where data may be missing, and its backfill state (one emission per revision)."""

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.GapEvent"
    TOPIC: ClassVar[TopicKind] = TopicKind.GAPS

    exchange: str = "okx"
    gap_id: str
    revision: int = 0
    kind: GapKind
    status: GapStatus
    reason: str
    channel: str
    inst_id: str | None = None
    inst_type: str | None = None
    before: StreamPosition | None = None
    after: StreamPosition | None = None
    opened_ts_ns: int | None = None
    detected_ts_ns: int
    updated_ts_ns: int | None = None
    conn_id: str | None = None
    conn_after: str | None = None
    shard: str | None = None
    attempts: int = 0
    records_filled: int | None = None
    note: str | None = None
    event_key: str | None = None

    def kafka_key(self) -> bytes:
        return f"{self.channel}:{self.inst_id or self.inst_type or ''}".encode()

    def kafka_ts_ms(self) -> int:
        return (self.updated_ts_ns or self.detected_ts_ns) // 1_000_000

    def emission_id(self) -> str:
        return f"gap:{self.gap_id}:{self.revision}"

    def source_header(self) -> str:
        return "ingest"


class DeadLetter(Record, frozen=True, kw_only=True):
    """A message that could not become records, kept byte for byte with the reason (never a silent drop)."""

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.DeadLetter"
    TOPIC: ClassVar[TopicKind] = TopicKind.DLQ

    exchange: str = "okx"
    reason_code: DeadLetterReason
    reason: str
    path: str | None = None
    raw: bytes
    source: Source
    conn_id: str | None = None
    name: str | None = None
    endpoint: str | None = None
    recv_seq: int | None = None
    recv_ts_ns: int
    channel: str | None = None
    inst_id: str | None = None
    record_id: str
    event_key: str | None = None

    def kafka_key(self) -> bytes:
        return (self.conn_id or "rest").encode()

    def kafka_ts_ms(self) -> int:
        return self.recv_ts_ns // 1_000_000

    def emission_id(self) -> str:
        return self.record_id

    def source_header(self) -> str:
        return self.source


class RawFrameEntry(msgspec.Struct, frozen=True, kw_only=True, rename=avro_field_name, gc=False):
    """Avro record `RawFrameEntry` (nested in RawFrames): one WebSocket text frame exactly as received."""

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.RawFrameEntry"

    recv_seq: int
    recv_ts_ns: int
    payload: bytes


class RawFrames(Record, frozen=True, kw_only=True):
    """Frames of one connection exactly as received, for audit and re-normalization.

    Batched (one record per connection per pipeline batch) because a Kafka record per frame doubled the
    records of the hot path for data nobody reads frame by frame; `frames` is never empty.
    """

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.RawFrames"
    TOPIC: ClassVar[TopicKind] = TopicKind.RAW

    exchange: str = "okx"
    conn_id: str
    name: str
    endpoint: str
    okx_conn_id: str | None = None
    frames: tuple[RawFrameEntry, ...]

    def kafka_key(self) -> bytes:
        return self.conn_id.encode()

    def kafka_ts_ms(self) -> int:
        return self.frames[-1].recv_ts_ns // 1_000_000

    def emission_id(self) -> str:
        return f"{self.conn_id}:{self.frames[0].recv_seq}-{self.frames[-1].recv_seq}"

    def source_header(self) -> str:
        return Source.WS.value


class RawFrame(Record, frozen=True, kw_only=True):
    """Legacy okx.raw record (one frame per record), written by builds before RawFrames; decode only."""

    AVRO_NAME: ClassVar[str] = "okx.ingest.v1.RawFrame"
    TOPIC: ClassVar[TopicKind] = TopicKind.RAW

    exchange: str = "okx"
    conn_id: str
    name: str
    endpoint: str
    recv_seq: int
    recv_ts_ns: int
    okx_conn_id: str | None = None
    payload: bytes

    def kafka_key(self) -> bytes:
        return self.conn_id.encode()

    def kafka_ts_ms(self) -> int:
        return self.recv_ts_ns // 1_000_000

    def emission_id(self) -> str:
        return f"{self.conn_id}:{self.recv_seq}"

    def source_header(self) -> str:
        return Source.WS.value


#: Every top-level record type, in schema-file order of docs/RECORDS.md.
RECORD_TYPES: tuple[type[Record], ...] = (
    Trade, BookUpdate, Ticker, Candle, MarkPrice, IndexTicker, FundingRate, OpenInterest, Liquidation, PriceLimit,
    Instrument, Order, Fill, Position, Balance, AlgoOrder, GapEvent, DeadLetter, RawFrames,
)
#: Record types no longer produced whose schemas stay in schemas/, so data written by older builds decodes.
LEGACY_RECORD_TYPES: tuple[type[Record], ...] = (RawFrame,)
#: Avro full name -> Struct type, for every record and nested record.
STRUCT_BY_AVRO_NAME: dict[str, type[msgspec.Struct]] = {
    **{cls.AVRO_NAME: cls for cls in RECORD_TYPES + LEGACY_RECORD_TYPES}, StreamPosition.AVRO_NAME: StreamPosition,
    RawFrameEntry.AVRO_NAME: RawFrameEntry,
}
