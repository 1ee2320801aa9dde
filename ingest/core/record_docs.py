"""The prose of the record contract: the Avro doc of every record, nested record, enum and field.

Kept beside `records.py` (the Structs, which say what the fields are) so that module stays readable; the
generator in `contract.py` puts each text into the .avsc files. Field docs are keyed by Struct attribute
name; a field without a doc, or a doc without a field, fails the generator. Edit here, then `make schemas`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

from ingest.core.records import (
    AlgoOrder,
    Balance,
    BookAction,
    BookUpdate,
    Candle,
    DeadLetter,
    DeadLetterReason,
    Fill,
    FundingRate,
    GapEvent,
    GapKind,
    GapStatus,
    IndexTicker,
    Instrument,
    Liquidation,
    MarkPrice,
    OpenInterest,
    Order,
    Position,
    PriceLimit,
    RawFrame,
    RawFrameEntry,
    RawFrames,
    Source,
    StreamPosition,
    Ticker,
    Trade,
)


@dataclass(frozen=True, slots=True)
class RecordDoc:
    """One record's Avro doc and the doc of each of its fields, by Struct attribute name."""

    doc: str
    fields: Mapping[str, str]


#: How to read decimals: part of the doc of every OKX record.
DECIMALS = ("Decimals (prices, sizes, amounts, rates) are the exact strings OKX sent, never floats: read them with "
            'decimal.Decimal(s) (exact) or float(s) (lossy); "" means OKX had no value.')

#: The Avro doc of each enum (the same wherever a record uses it).
ENUM_DOCS: Mapping[type[enum.Enum], str] = {
    Source: "Where a record came from.",
    BookAction: ("snapshot replaces the whole book; update applies the levels to it; checkpoint is the recorder's "
                 "full copy of its verified book."),
    GapKind: "Why data may be missing.",
    GapStatus: "Backfill state of a gap.",
    DeadLetterReason: "Why a message could not become records.",
}

#: The common fields of every market and private record (`OkxRecord`), as most records document them; a
#: record that says more about one of them overrides it.
_OKX_FIELDS: Mapping[str, str] = {
    "exchange": 'Always "okx".',
    "channel": ("OKX channel this row came from (e.g. trades, books5, candle1m); a REST row carries the channel it "
                "stands in for."),
    "inst_id": "Instrument ID exactly as OKX sent it (e.g. BTC-USDT-SWAP). Kafka key of market-data topics.",
    "inst_type": ("SPOT, MARGIN, SWAP, FUTURES or OPTION when the message carried it; null when OKX did not send it "
                  "(never guessed from instId)."),
    "ts": ("Exchange time of this row, epoch milliseconds (OKX ts); the record doc says which OKX field it is where "
           "that differs."),
    "recv_ts_ns": "Local receive time of the WebSocket frame or REST response, epoch nanoseconds (time.time_ns()).",
    "source": "ws: recorded from the WebSocket stream; rest: fetched over REST (backfill or reconciliation).",
    "conn_id": "Our physical WebSocket connection (unique forever); null for rest.",
    "recv_seq": "Position of the frame on connId, from 1; null for rest.",
    "record_id": ("Stable id of this emission: {connId}:{recvSeq}:{index} for ws, rest:{channel}:{natural id} for "
                  "rest. Two records with the same recordId are at-least-once duplicates; keep one."),
    "extra": ("Fields OKX sent that this schema version does not name: key -> JSON text of the value (a string "
              "arrives quoted). Keys arg.<k>, push.<k> and parent.<k> come from the subscription arg, the push "
              "envelope or the enclosing object. Empty when OKX sent nothing new."),
    "event_key": ("Natural event key: names the exchange event this record is, the same whoever recorded it and "
                  "however (ws or rest), so the same event recorded twice (two replicas, a hand-over, a backfill) can "
                  'be dropped; also the event_key header. Spelling per channel: docs/RECORDS.md, "Event keys". Null '
                  "only in records written before the field existed."),
}

#: Every record and nested record Struct -> its docs.
RECORD_DOCS: Mapping[type[msgspec.Struct], RecordDoc] = {
    Trade: RecordDoc(
        "A public trade from trades (aggregated per taker order, price and source) or trades-all (one trade per "
        f"message), or a REST history-trades row. {DECIMALS} Key: instId. ts is the trade time.",
        {
            **_OKX_FIELDS,
            "trade_id": ("Trade ID, an integer string unique per instId (negative for liquidation/ADL fills). On "
                         "trades it is the last id of the aggregation."),
            "px": "Trade price (decimal string).",
            "sz": "Trade size (decimal string): contracts for derivatives, base currency for SPOT/MARGIN.",
            "side": "Taker side: buy or sell.",
            "count": ("trades only: number of trades aggregated (integer string); the message covers ids "
                      "tradeId-count+1 .. tradeId. Null on trades-all and REST rows."),
            "seq_id": ("trades only (since 2025-07): OKX market-data sequence number; simultaneous trades may share "
                       "one. Null when OKX did not send it."),
            "okx_source": ("OKX's own source field of the trade: \"0\" normal, \"1\" ELP/RPI maker (since 2025-11). "
                           "Renamed: source is the ingest source."),
        },
    ),
    BookUpdate: RecordDoc(
        "One order-book push of books, books5, bbo-tbt, books-l2-tbt or books50-l2-tbt, or a REST /market/books "
        f"snapshot. {DECIMALS} Level strings are kept verbatim so the CRC32 checksum can be recomputed on replay. "
        "Key: instId. ts is OKX's book time (bbo-tbt: matching-engine trigger time).",
        {
            **_OKX_FIELDS,
            "action": ('snapshot replaces the book, update applies the levels (size "0" deletes the price, any other '
                       "size replaces the level). books5, bbo-tbt and REST books are always snapshots. checkpoint "
                       "(incremental books, every okx.book_checkpoint_s): the whole verified book as the recorder "
                       "holds it after the update with this seqId; replace the book with it like a snapshot, but the "
                       "chain goes on: the next update's prevSeqId is this seqId (prevSeqId is null)."),
            "asks": ('Ask levels as OKX sent them, best first: [px, sz, "0" (deprecated, always "0"), numOrders], '
                     "four strings each."),
            "bids": ('Bid levels as OKX sent them, best first: [px, sz, "0" (deprecated, always "0"), numOrders], '
                     "four strings each."),
            "seq_id": "Sequence number of this push (per instId); null when not sent (pushes before 2023-06).",
            "prev_seq_id": ("seqId of the previous push: -1 on a snapshot, equal to seqId on a keepalive; null on "
                            "books5/bbo-tbt and REST."),
            "checksum": ("OKX CRC32 (signed 32-bit) of the top 25 levels after applying this push; always 0 since "
                         "2026-06-23; null where not sent."),
        },
    ),
    Ticker: RecordDoc(
        f"A tickers push: last trade, best bid/ask and 24h statistics. {DECIMALS} Key: instId.",
        {
            **_OKX_FIELDS,
            "last": "Last traded price.",
            "last_sz": 'Last traded size ("0" means no volume).',
            "ask_px": "Best ask price.",
            "ask_sz": "Best ask size.",
            "bid_px": "Best bid price.",
            "bid_sz": "Best bid size.",
            "open24h": "Open price 24 hours ago.",
            "high24h": "Highest price over the last 24 hours.",
            "low24h": "Lowest price over the last 24 hours.",
            "vol_ccy24h": "24h volume: quote currency for SPOT/MARGIN, base currency for derivatives.",
            "vol24h": "24h volume: base currency for SPOT/MARGIN, contracts for derivatives.",
            "sod_utc0": "Open price at 00:00 UTC.",
            "sod_utc8": "Open price at 00:00 UTC+8.",
        },
    ),
    Candle: RecordDoc(
        "One candlestick of candle<bar>, mark-price-candle<bar> or index-candle<bar> (channel says which), or a REST "
        f"candles row. {DECIMALS} Key: instId. ts is the bar's open time.",
        {
            **_OKX_FIELDS,
            "bar": "Bar size from the channel name, e.g. 1m, 1H, 1Dutc.",
            "o": "Open price.",
            "h": "Highest price.",
            "l": "Lowest price.",
            "c": "Close price.",
            "vol": ("Volume: contracts for derivatives, base currency for SPOT/MARGIN; null for mark-price and index "
                    "candles."),
            "vol_ccy": ("Volume: base currency for derivatives, quote currency for SPOT/MARGIN; null for mark-price "
                        "and index candles."),
            "vol_ccy_quote": ("Volume in quote currency (e.g. USDT for BTC-USDT-SWAP); null when the array had no "
                              "such element."),
            "confirm": ('false while the bar is still forming, true once complete (OKX "0"/"1"); null for old '
                        "7-element arrays."),
        },
    ),
    MarkPrice: RecordDoc(
        f"A mark-price push. {DECIMALS} Key: instId.",
        {
            **_OKX_FIELDS,
            "mark_px": "Mark price.",
        },
    ),
    IndexTicker: RecordDoc(
        f"An index-tickers push (instId is an index such as BTC-USDT). {DECIMALS} Key: instId.",
        {
            **_OKX_FIELDS,
            "idx_px": "Index price.",
            "open24h": "Open price 24 hours ago.",
            "high24h": "Highest index price over the last 24 hours.",
            "low24h": "Lowest index price over the last 24 hours.",
            "sod_utc0": "Open price at 00:00 UTC.",
            "sod_utc8": "Open price at 00:00 UTC+8.",
        },
    ),
    FundingRate: RecordDoc(
        f"A funding-rate push of a SWAP. {DECIMALS} OKX treats every field as optional (2021 frames had five); ts is "
        "OKX's ts, or the local receive time in ms when the push had none. Key: instId.",
        {
            **_OKX_FIELDS,
            "method": "Funding method: current_period (next_period is no longer supported).",
            "formula_type": "noRate (old formula) or withRate (new formula).",
            "funding_rate": "Current funding rate.",
            "next_funding_rate": 'Forecast next funding rate ("" under current_period).',
            "funding_time": "Settlement time of the current period, epoch ms as a string.",
            "next_funding_time": ("Next settlement time, epoch ms as a string; the interval is nextFundingTime - "
                                  "fundingTime."),
            "min_funding_rate": "Lower bound of the funding rate.",
            "max_funding_rate": "Upper bound of the funding rate.",
            "interest_rate": "Interest rate used by the formula.",
            "impact_value": "Depth-weighted notional used by the formula.",
            "premium": "Premium index.",
            "sett_state": "processing or settled.",
            "sett_funding_rate": "Funding rate of the last settlement.",
        },
    ),
    OpenInterest: RecordDoc(
        f"An open-interest push. {DECIMALS} Key: instId.",
        {
            **_OKX_FIELDS,
            "oi": "Open interest in contracts.",
            "oi_ccy": "Open interest in coin.",
            "oi_usd": "Open interest in USD (missing in older frames).",
        },
    ),
    Liquidation: RecordDoc(
        "One liquidation order: OKX pushes liquidation-orders as rows with a details array; each detail becomes one "
        "record carrying its row's instId/instFamily/uly. OKX sends a sample (at most one order per contract per "
        f"second), not every liquidation. {DECIMALS} Key: instId. ts is the detail's ts.",
        {
            **_OKX_FIELDS,
            "inst_family": "Instrument family, e.g. BTC-USD.",
            "uly": "Underlying, e.g. BTC-USD.",
            "side": "Order side of the liquidation order: buy or sell.",
            "pos_side": "Position side: long, short or net.",
            "bk_px": "Bankruptcy price.",
            "sz": "Quantity: contracts for derivatives, base currency for MARGIN.",
            "bk_loss": "Bankruptcy loss.",
            "ccy": "Liquidated currency (MARGIN only).",
        },
    ),
    PriceLimit: RecordDoc(
        f"A price-limit push: the highest buy and lowest sell price allowed. {DECIMALS} Key: instId.",
        {
            **_OKX_FIELDS,
            "buy_lmt": 'Highest buy limit ("" when limits are disabled).',
            "sell_lmt": 'Lowest sell limit ("" when limits are disabled).',
            "enabled": "Whether price limits apply (OKX boolean); null in older frames.",
        },
    ),
    Instrument: RecordDoc(
        "An instrument definition from the instruments channel (changes only) or GET /api/v5/public/instruments. "
        f"{DECIMALS} Instruments carry no event time: ts is the local receive time in ms. Nested values are JSON "
        "text. Key: instId.",
        {
            **_OKX_FIELDS,
            "series_id": "Series of an EVENTS contract.",
            "uly": "Underlying (derivatives).",
            "group_id": "Instrument trading-fee group.",
            "inst_family": "Instrument family (derivatives).",
            "category": "Deprecated currency category.",
            "inst_category": "Asset category of the instrument.",
            "base_ccy": "Base currency (SPOT/MARGIN).",
            "quote_ccy": "Quote currency (SPOT/MARGIN).",
            "settle_ccy": "Settlement and margin currency (derivatives).",
            "ct_val": "Contract value.",
            "ct_mult": "Contract multiplier.",
            "ct_val_ccy": "Contract value currency.",
            "opt_type": "Option type: C or P.",
            "stk": "Strike price (OPTION).",
            "list_time": "Listing time, epoch ms as a string.",
            "auction_end_time": "End of the call auction, epoch ms as a string (deprecated by contTdSwTime).",
            "cont_td_sw_time": ("Switch time from call auction or pre-market to continuous trading, epoch ms as a "
                                "string."),
            "pre_mkt_sw_time": "Switch time from pre-market to normal trading, epoch ms as a string.",
            "open_type": "How trading opens: fix_price, pre_quote or call_auction.",
            "exp_time": "Expiry time, epoch ms as a string.",
            "lever": "Maximum leverage.",
            "tick_sz": "Tick size.",
            "lot_sz": "Lot size.",
            "min_sz": "Minimum order size.",
            "ct_type": "linear or inverse.",
            "alias": "Alias: this_week, next_week, quarter, next_quarter... (deprecated).",
            "state": "live, suspend, expired, preopen, test...",
            "rule_type": "normal or pre_market.",
            "max_lmt_sz": "Maximum limit order size.",
            "max_mkt_sz": "Maximum market order size.",
            "max_lmt_amt": "Maximum limit order value (USD).",
            "max_mkt_amt": "Maximum market order value (USD).",
            "max_twap_sz": "Maximum TWAP order size.",
            "max_iceberg_sz": "Maximum iceberg order size.",
            "max_trigger_sz": "Maximum trigger order size.",
            "max_stop_sz": "Maximum stop market order size.",
            "future_settlement": "Whether daily settlement applies to expiry futures (OKX boolean).",
            "trade_quote_ccy_list": 'JSON text of the list of quote currencies usable for trading, e.g. ["USDT"].',
            "inst_id_code": "Numeric instrument code (SBE); differs between live and demo and changes on relisting.",
            "init_px_lmt_pct": "Initial price-limit band after listing.",
            "float_px_lmt_pct": "Floating price-limit band.",
            "max_px_lmt_pct": "Maximum price-limit deviation.",
            "rpi_min_level": "RPI minimum spacing in organic price levels.",
            "rpi_min_px_band": "RPI minimum distance from the opposite organic best price, bps.",
            "upc_chg": "JSON text of upcoming parameter changes ([] when none).",
        },
    ),
    Order: RecordDoc(
        "One update of one of our orders from the orders channel, or a REST orders-history row (then the fill* "
        f"fields describe the last fill). OKX may push the same update twice; see its dedupe rules. {DECIMALS} "
        "Nested values are JSON text. Key: ordId. ts is uTime.",
        {
            **_OKX_FIELDS,
            "uid": "Account uid from the push's arg.uid (which account this is); null for rest rows.",
            "ord_id": "Order ID. Kafka key: every update of one order stays in one partition, in order.",
            "cl_ord_id": "Client order ID.",
            "tag": "Order tag.",
            "tgt_ccy": "Order quantity unit for SPOT market orders: base_ccy or quote_ccy.",
            "ccy": "Margin currency.",
            "px": 'Order price ("" for market orders).',
            "px_usd": "Options price in USD.",
            "px_vol": "Options price in implied volatility.",
            "px_type": "Options price type: px, pxVol or pxUsd.",
            "sz": "Order quantity.",
            "notional_usd": "Estimated notional value in USD.",
            "ord_type": ("market, limit, post_only, fok, ioc, optimal_limit_ioc, mmp, mmp_and_post_only, op_fok, "
                         "elp/rpi..."),
            "side": "buy or sell.",
            "pos_side": "Position side: long, short or net.",
            "td_mode": "Trade mode: cross, isolated or cash.",
            "fill_px": "Price of this update's fill (WS: this update only; REST: last fill).",
            "trade_id": "Trade ID of this update's fill; empty when the update is not a fill.",
            "fill_sz": "Quantity of this update's fill.",
            "fill_pnl": "Profit and loss of this update's fill.",
            "fill_time": "Time of this update's fill, epoch ms as a string.",
            "fill_fee": "Fee of this update's fill (negative = charged).",
            "fill_fee_ccy": "Currency of fillFee.",
            "fill_px_vol": "Implied volatility at the fill (options).",
            "fill_px_usd": "Fill price in USD (options).",
            "fill_mark_vol": "Mark volatility at the fill (options).",
            "fill_fwd_px": "Forward price at the fill (options).",
            "fill_mark_px": "Mark price at the fill.",
            "fill_idx_px": "Index price at the fill.",
            "exec_type": "Liquidity of the fill: T taker, M maker.",
            "acc_fill_sz": "Accumulated fill quantity.",
            "fill_notional_usd": "Notional of the fill in USD.",
            "avg_px": 'Average filled price ("" when nothing filled).',
            "state": "live, partially_filled, filled, canceled or mmp_canceled.",
            "lever": "Leverage.",
            "attach_algo_cl_ord_id": "Client id of the attached TP/SL algo order.",
            "tp_trigger_px": "Take-profit trigger price.",
            "tp_trigger_px_type": "Take-profit trigger price type: last, index or mark.",
            "tp_ord_px": "Take-profit order price (-1 = market).",
            "sl_trigger_px": "Stop-loss trigger price.",
            "sl_trigger_px_type": "Stop-loss trigger price type: last, index or mark.",
            "sl_ord_px": "Stop-loss order price (-1 = market).",
            "attach_algo_ords": "JSON text of the attached TP/SL algo orders array.",
            "linked_algo_ord": 'JSON text of the linked algo order object, e.g. {"algoId":""}.',
            "stp_id": "Self-trade-prevention id (deprecated).",
            "stp_mode": "Self-trade-prevention mode.",
            "fee_ccy": "Currency of fee.",
            "fee": "Accumulated fee and rebate (negative = charged).",
            "rebate_ccy": "Currency of rebate.",
            "rebate": "Accumulated rebate.",
            "pnl": "Profit and loss.",
            "okx_source": ("OKX's own source field of the order (e.g. 6: triggered by a trigger order). Renamed: "
                           "source is the ingest source."),
            "cancel_source": "Why the order was canceled (code).",
            "cancel_source_reason": "Why the order was canceled (text, REST).",
            "amend_source": "Why the order was amended (code).",
            "category": "normal, twap, adl, full_liquidation, partial_liquidation, delivery, ddh...",
            "is_tp_limit": '"true" if the take-profit is a limit order.',
            "u_time": "Update time, epoch ms as a string (also the record's ts).",
            "c_time": "Creation time, epoch ms as a string.",
            "req_id": "Client request id of an amend.",
            "amend_result": "Result of an amend: -1 failed, 0 success, 1 auto-cancel after failure.",
            "reduce_only": '"true" or "false".',
            "quick_mgn_type": "Quick margin type (deprecated).",
            "algo_cl_ord_id": "Client id of the algo order that triggered this order.",
            "algo_id": "Id of the algo order that triggered this order.",
            "last_px": "Last price when the order was placed or updated.",
            "code": 'Error code of the update ("0" = success).',
            "msg": "Error message of the update.",
            "trade_quote_ccy": "Quote currency used for trading.",
        },
    ),
    Fill: RecordDoc(
        "One of our fills from the fills channel (order-book fills only) or a REST fills / fills-history row. The "
        f"orders channel stays authoritative. {DECIMALS} Key: ordId. ts is the fill's ts.",
        {
            **_OKX_FIELDS,
            "uid": "Account uid from the push's arg.uid (which account this is); null for rest rows.",
            "trade_id": "Trade ID (last id of the aggregation for takers).",
            "ord_id": "Order ID. Kafka key, shared with the order's updates.",
            "cl_ord_id": 'Client order ID (WS echoes it only when it is a positive int64 string, else "0").',
            "bill_id": "Bill ID (REST only).",
            "sub_type": "Bill subtype (REST only).",
            "tag": "Order tag (REST only).",
            "fill_px": "Fill price.",
            "fill_sz": "Fill quantity (aggregated for takers).",
            "fill_idx_px": "Index price at the fill.",
            "fill_pnl": "Profit and loss of the fill.",
            "fill_px_vol": "Implied volatility at the fill (options).",
            "fill_px_usd": "Fill price in USD (options).",
            "fill_mark_vol": "Mark volatility at the fill (options).",
            "fill_fwd_px": "Forward price at the fill (options).",
            "fill_mark_px": "Mark price at the fill.",
            "side": "buy or sell.",
            "pos_side": "Position side: long, short or net.",
            "exec_type": "Liquidity: T taker, M maker.",
            "fee_ccy": "Fee currency.",
            "fee": "Fee (negative = charged, positive = rebate).",
            "fee_rate": "Fee rate.",
            "fill_time": "Fill time, epoch ms as a string (REST).",
            "count": "Number of trades aggregated (WS, integer string).",
            "trade_quote_ccy": "Quote currency used for trading.",
        },
    ),
    Position: RecordDoc(
        "One position from the positions channel, from a balance_and_position row's posData, or a REST "
        f"/account/positions row. {DECIMALS} Nested values are JSON text. Key: instId (all positions of an "
        "instrument in one partition). ts is uTime.",
        {
            **_OKX_FIELDS,
            "uid": "Account uid from the push's arg.uid (which account this is); null for rest rows.",
            "event_type": ("positions: snapshot or event_update (push level); balance_and_position: the event type of "
                           "its row."),
            "cur_page": "Page number of a paginated positions snapshot (push level).",
            "last_page": "Whether this is the last page of a positions snapshot (push level).",
            "p_time": "Push time, epoch ms as a string.",
            "trades": ("balance_and_position only: JSON text of the trades that caused the change, [{instId, "
                       "tradeId}]."),
            "pos_id": "Position ID.",
            "mgn_mode": "Margin mode: cross or isolated.",
            "pos_side": "long, short or net.",
            "pos": "Quantity of the position.",
            "pos_ccy": "Position currency (MARGIN).",
            "avail_pos": "Position that can be closed.",
            "avg_px": "Average open price.",
            "non_settle_avg_px": "Non-settlement entry price.",
            "settled_pnl": "Accumulated settled P&L.",
            "upl": "Unrealized P&L by mark price.",
            "upl_ratio": "Unrealized P&L ratio by mark price.",
            "upl_last_px": "Unrealized P&L by last price.",
            "upl_ratio_last_px": "Unrealized P&L ratio by last price.",
            "lever": "Leverage.",
            "liq_px": "Estimated liquidation price.",
            "mark_px": "Latest mark price.",
            "imr": "Initial margin requirement.",
            "margin": "Margin (isolated).",
            "mgn_ratio": "Maintenance margin ratio.",
            "mmr": "Maintenance margin requirement.",
            "liab": "Liabilities (MARGIN).",
            "liab_ccy": "Liabilities currency.",
            "interest": "Interest accrued.",
            "trade_id": "Last trade ID.",
            "notional_usd": "Notional value in USD.",
            "opt_val": "Option value.",
            "pending_close_ord_liab_val": "Liability of pending close orders.",
            "adl": "Auto-deleveraging indicator, 1 (low) to 5 (high).",
            "biz_ref_id": "External business id (e.g. experience coupon).",
            "biz_ref_type": "External business type.",
            "ccy": "Currency used for margin.",
            "last": "Latest traded price.",
            "idx_px": "Latest index price.",
            "usd_px": "Latest USD price of the ccy.",
            "be_px": "Break-even price.",
            "delta_bs": "Delta, Black-Scholes, in dollars.",
            "delta_pa": "Delta in coins.",
            "gamma_bs": "Gamma, Black-Scholes, in dollars.",
            "gamma_pa": "Gamma in coins.",
            "theta_bs": "Theta, Black-Scholes, in dollars.",
            "theta_pa": "Theta in coins.",
            "vega_bs": "Vega, Black-Scholes, in dollars.",
            "vega_pa": "Vega in coins.",
            "spot_in_use_amt": "Spot in use amount (portfolio margin).",
            "spot_in_use_ccy": "Spot in use unit, e.g. BTC.",
            "cl_spot_in_use_amt": "User-defined spot risk offset amount.",
            "max_spot_in_use_amt": "Maximum possible spot risk offset amount.",
            "realized_pnl": "Realized P&L.",
            "pnl": "Accumulated P&L of closing orders.",
            "fee": "Accumulated fee (negative = charged).",
            "funding_fee": "Accumulated funding fee.",
            "liq_penalty": "Accumulated liquidation penalty (negative).",
            "close_order_algo": "JSON text of the close-position algo orders array.",
            "base_bal": "Base currency balance (deprecated quick-margin field).",
            "base_borrowed": "Base currency borrowed (deprecated).",
            "base_interest": "Base currency interest (deprecated).",
            "quote_bal": "Quote currency balance (deprecated).",
            "quote_borrowed": "Quote currency borrowed (deprecated).",
            "quote_interest": "Quote currency interest (deprecated).",
            "c_time": "Creation time, epoch ms as a string.",
            "u_time": "Last update time, epoch ms as a string (also the record's ts).",
        },
    ),
    Balance: RecordDoc(
        "Account balances from the account channel, a balance_and_position row's balData or GET "
        "/api/v5/account/balance. One OKX account row becomes a totals record (ccy null) plus one record per "
        f"currency detail; balance_and_position rows give per-currency records only. {DECIMALS} instId is always "
        'null (balances are per currency). Key: ccy or "account". ts is uTime (pTime when uTime is empty).',
        {
            **_OKX_FIELDS,
            "inst_id": "Always null: balances are per currency, not per instrument.",
            "uid": "Account uid from the push's arg.uid (which account this is); null for rest rows.",
            "ccy": ("Currency of a per-currency row; null on the account-wide totals row. Kafka key: ccy, or "
                    '"account" for the totals row.'),
            "event_type": ("account: snapshot or event_update (push level); balance_and_position: the event type of "
                           "its row."),
            "cur_page": "Page number of a paginated account snapshot (push level).",
            "last_page": "Whether this is the last page of an account snapshot (push level).",
            "p_time": "balance_and_position push time, epoch ms as a string.",
            "trades": ("balance_and_position only: JSON text of the trades that caused the change, [{instId, "
                       "tradeId}]."),
            "u_time": "Update time, epoch ms as a string (also the record's ts).",
            "total_eq": "Totals row: total equity in USD.",
            "iso_eq": "Isolated margin equity (USD on the totals row, ccy on a currency row).",
            "adj_eq": "Totals row: adjusted / effective equity in USD.",
            "avail_eq": "Available equity (USD on the totals row, ccy on a currency row).",
            "ord_froz": "Totals row: cross margin frozen for pending orders in USD.",
            "imr": "Initial margin requirement.",
            "mmr": "Maintenance margin requirement.",
            "borrow_froz": "Potential borrowing IMR.",
            "mgn_ratio": "Maintenance margin ratio.",
            "notional_usd": "Totals row: notional value of positions in USD.",
            "notional_usd_for_borrow": "Totals row: notional value for borrowing in USD.",
            "notional_usd_for_swap": "Totals row: notional value of SWAP positions in USD.",
            "notional_usd_for_futures": "Totals row: notional value of FUTURES positions in USD.",
            "notional_usd_for_option": "Totals row: notional value of OPTION positions in USD.",
            "upl": "Unrealized P&L.",
            "eq": "Equity of the currency.",
            "cash_bal": "Cash balance.",
            "dis_eq": "Discounted equity in USD.",
            "fixed_bal": "Frozen balance for dip/peak sniper.",
            "avail_bal": "Available balance.",
            "frozen_bal": "Frozen balance.",
            "ord_frozen": "Margin frozen for open orders.",
            "liab": "Liabilities.",
            "upl_liab": "Liabilities due to unrealized loss.",
            "cross_liab": "Cross liabilities.",
            "iso_liab": "Isolated liabilities.",
            "reward_bal": "Trial fund balance.",
            "interest": "Accrued interest.",
            "twap": "Risk indicator of auto liability repayment (0 to 5).",
            "max_loan": "Maximum loan.",
            "eq_usd": "Equity in USD.",
            "notional_lever": "Leverage of the currency.",
            "coin_usd_price": "Price index in USD of the currency.",
            "stgy_eq": "Strategy equity.",
            "iso_upl": "Isolated unrealized P&L.",
            "spot_in_use_amt": "Spot in use amount (portfolio margin).",
            "cl_spot_in_use_amt": "User-defined spot risk offset amount.",
            "max_spot_in_use_amt": "Maximum possible spot risk offset amount.",
            "spot_iso_bal": "Spot isolated balance.",
            "smt_sync_eq": "Smart sync equity.",
            "spot_copy_trading_eq": "Spot copy-trading equity.",
            "spot_bal": "Spot balance.",
            "open_avg_px": "Spot average open price.",
            "acc_avg_px": "Spot accumulated cost price.",
            "spot_upl": "Spot unrealized P&L.",
            "spot_upl_ratio": "Spot unrealized P&L ratio.",
            "total_pnl": "Spot accumulated P&L.",
            "total_pnl_ratio": "Spot accumulated P&L ratio.",
            "col_res": "Platform-level collateral restriction status.",
            "col_borr_auto_conversion": "Risk indicator of auto conversion.",
            "collateral_restrict": "Platform-level collateral restriction (OKX boolean).",
            "collateral_enabled": "Whether the currency is enabled as collateral (OKX boolean).",
            "auto_lend_status": "Auto-lend status (REST).",
            "auto_lend_mt_amt": "Auto-lend matched amount (REST).",
        },
    ),
    AlgoOrder: RecordDoc(
        f"One update of one of our algo orders from the orders-algo channel. {DECIMALS} Nested values are JSON text. "
        "Key: algoId. ts is uTime.",
        {
            **_OKX_FIELDS,
            "uid": "Account uid from the push's arg.uid (which account this is); null for rest rows.",
            "algo_id": "Algo order ID. Kafka key.",
            "algo_cl_ord_id": "Client algo order ID.",
            "ord_id": "Latest triggered order ID (deprecated, see ordIdList).",
            "ord_id_list": "JSON text of the triggered order IDs.",
            "cl_ord_id": "Client order ID.",
            "ccy": "Margin currency.",
            "sz": "Quantity.",
            "ord_type": "conditional, oco, trigger, chase...",
            "side": "buy or sell.",
            "pos_side": "long, short or net.",
            "td_mode": "Trade mode.",
            "tgt_ccy": "base_ccy or quote_ccy.",
            "lever": "Leverage.",
            "state": "live, effective, canceled, order_failed, partially_failed, partially_effective.",
            "tp_trigger_px": "Take-profit trigger price.",
            "tp_trigger_px_type": "Take-profit trigger price type.",
            "tp_ord_px": "Take-profit order price (-1 = market).",
            "sl_trigger_px": "Stop-loss trigger price.",
            "sl_trigger_px_type": "Stop-loss trigger price type.",
            "sl_ord_px": "Stop-loss order price (-1 = market).",
            "trigger_px": "Trigger price.",
            "trigger_px_type": "Trigger price type.",
            "ord_px": "Order price (-1 = market).",
            "last": "Last price when the algo order was placed or updated.",
            "actual_sz": "Actual order quantity.",
            "actual_px": "Actual order price.",
            "actual_side": "Actual side: tp or sl.",
            "notional_usd": "Estimated notional in USD.",
            "tag": "Order tag.",
            "trigger_time": "Trigger time, epoch ms as a string.",
            "reduce_only": '"true" or "false".',
            "fail_code": "Error code when the trigger failed.",
            "req_id": "Client request id of an amend.",
            "amend_result": "Result of an amend.",
            "amend_px_on_trigger_type": "Whether the trigger price can be amended.",
            "attach_algo_ords": "JSON text of the attached TP/SL orders array.",
            "linked_ord": "JSON text of the linked limit order object.",
            "close_fraction": "Fraction of the position to close.",
            "quick_mgn_type": "Quick margin type (deprecated).",
            "is_trade_borrow_mode": "Whether borrowing happens automatically.",
            "chase_type": "Chase type (chase orders).",
            "chase_val": "Chase value.",
            "max_chase_type": "Maximum chase type.",
            "max_chase_val": "Maximum chase value.",
            "trade_quote_ccy": "Quote currency used for trading.",
            "c_time": "Creation time, epoch ms as a string.",
            "u_time": "Update time, epoch ms as a string (also the record's ts).",
        },
    ),
    GapEvent: RecordDoc(
        "A stretch of one stream where data may be missing, and its backfill state. Emitted when detected (status "
        "open) and again by the backfill worker at every change (revision + 1). Key: {channel}:{instId} "
        "({channel}:{instType} for instType streams).",
        {
            "exchange": 'Always "okx".',
            "gap_id": "Unique id of the gap; every revision repeats it.",
            "revision": ("0 when detected, +1 for each later emission of this gap. Kafka header record_id is "
                         "gap:{gapId}:{revision}."),
            "kind": ("Why data may be missing: disconnect, seq_break (book seqId chain broken), checksum_mismatch, "
                     "trade_hole (tradeId jump), subscribe_failed, reset (seqId reset), cutover (64008 hand-over), "
                     "dead_letter (a frame could not be normalized)."),
            "status": ("open: not backfilled yet; filled: completely backfilled; partial: some of it; unfillable: "
                       "REST cannot supply it (e.g. books, or older than REST history)."),
            "reason": "Human-readable cause, e.g. the close code or the two seqIds.",
            "channel": "Channel of the affected stream.",
            "inst_id": "Instrument of the affected stream; null for streams subscribed by instType.",
            "inst_type": "instType of the affected stream when known.",
            "before": "Last good position before the gap; null when nothing was received before it.",
            "after": "First good position after the gap; null while unknown.",
            "opened_ts_ns": ("Local time the stream was last known good, epoch nanoseconds: the lower time bound when "
                             "before is null."),
            "detected_ts_ns": ("Local time the gap was detected, epoch nanoseconds: the upper time bound when after "
                               "is null."),
            "updated_ts_ns": "Local time of this revision, epoch nanoseconds; null on revision 0.",
            "conn_id": "Connection that carried the stream before the gap.",
            "conn_after": "Connection that carried the stream after the gap; null while unknown.",
            "shard": "Shard (process) that detected the gap.",
            "attempts": "Backfill attempts so far.",
            "records_filled": "Records the backfill has published for this gap so far.",
            "note": "Backfill worker's note (last error, range fetched...).",
            "event_key": ("Event key of this revision of the gap: gaps:{gapId}:{revision} (also the event_key "
                          'header); null only in records written before the field existed. docs/RECORDS.md, "Event '
                          'keys".'),
        },
    ),
    StreamPosition: RecordDoc(
        "A position in one stream: whichever of ts, tradeId and seqId the stream has.",
        {
            "ts": "Exchange time, epoch milliseconds.",
            "trade_id": ("Trade ID (trade streams); the missing ids lie strictly between before.tradeId and "
                         "after.tradeId."),
            "seq_id": "seqId (book and trades streams).",
        },
    ),
    DeadLetter: RecordDoc(
        "A message that could not become records, kept byte for byte with the reason, so nothing is silently dropped "
        'and it can be re-normalized after a fix. Key: connId ("rest" for REST rows).',
        {
            "exchange": 'Always "okx".',
            "reason_code": ("Category of the failure. unsubscribed: a push for an arg this recorder never subscribed "
                            "(kept here, never recorded as data, so such pushes cannot grow its memory)."),
            "reason": ('Human-readable reason naming the offending field, e.g. data[0].px: "NaN" is not a finite '
                       "decimal."),
            "path": "JSON path of the offending value, e.g. data[0].px; null when the whole message is at fault.",
            "raw": "The message exactly as received (ws), or the REST row re-serialised as JSON (rest).",
            "source": "ws or rest.",
            "conn_id": "Our connection that received it; null for rest.",
            "name": "Logical connection name, e.g. public-0; null for rest.",
            "endpoint": "WebSocket endpoint path (e.g. /ws/v5/public) or REST path.",
            "recv_seq": "Position of the frame on connId; null for rest.",
            "recv_ts_ns": "Local receive time, epoch nanoseconds.",
            "channel": "Channel, when it could be read.",
            "inst_id": "Instrument, when it could be read.",
            "record_id": ("Stable id of this emission: {connId}:{recvSeq}:dlq for ws, rest:{channel}:dlq:{crc32 of "
                          "raw}:{recvTsNs} for rest."),
            "event_key": ("Event key: dlq:{digest of raw}, the same for the same bytes whoever received them (also "
                          "the event_key header); null only in records written before the field existed. "
                          'docs/RECORDS.md, "Event keys".'),
        },
    ),
    RawFrames: RecordDoc(
        "Consecutive WebSocket text frames of one connection, each exactly as received (every frame but pong), for "
        "audit and re-normalization. One record per connection and batch of frames the recorder processed together "
        "(at most about kafka.max_record_bytes / 2 of payload), so the raw archive costs one Kafka record per batch "
        "rather than per frame. Key: connId. Kafka header record_id is {connId}:{first recvSeq}-{last recvSeq}; a "
        "resend after a restart repeats the same record with the same record_id.",
        {
            "exchange": 'Always "okx".',
            "conn_id": "Our physical connection (unique forever).",
            "name": "Logical connection name, stable across reconnects, e.g. public-0.",
            "endpoint": "WebSocket endpoint path, e.g. /ws/v5/public.",
            "okx_conn_id": ("OKX's connId for this connection, when known from an ack (the same for every frame of "
                            "the record)."),
            "frames": "The frames in receive order, at least one.",
        },
    ),
    RawFrameEntry: RecordDoc(
        "One frame as received.",
        {
            "recv_seq": ("Position of the frame on connId, from 1 (every frame but pong counts, so a connection's "
                         "records together hold every recvSeq once)."),
            "recv_ts_ns": "Local receive time, epoch nanoseconds.",
            "payload": "The frame's bytes exactly as received.",
        },
    ),
    RawFrame: RecordDoc(
        "Legacy: the okx.raw record of builds before RawFrames (one WebSocket text frame per record). No longer "
        "produced; kept so okx.raw data written by those builds still decodes with schemas/ alone. Key: connId. "
        "Kafka header record_id is {connId}:{recvSeq}.",
        {
            "exchange": 'Always "okx".',
            "conn_id": "Our physical connection (unique forever).",
            "name": "Logical connection name, stable across reconnects, e.g. public-0.",
            "endpoint": "WebSocket endpoint path, e.g. /ws/v5/public.",
            "recv_seq": "Position of the frame on connId, from 1.",
            "recv_ts_ns": "Local receive time, epoch nanoseconds.",
            "okx_conn_id": "OKX's connId for this connection, when known from an ack.",
            "payload": "The frame's bytes exactly as received.",
        },
    ),
}
