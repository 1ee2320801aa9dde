"""Instrument specifications the simulated market trades, with OKX's precisions and contract terms.

An instrument id alone decides its type (SPOT `BTC-USDT`, SWAP `BTC-USDT-SWAP`, FUTURES `BTC-USD-261225`) and,
for the currencies below, realistic tick/lot sizes and contract values; other currencies get generic ones.
Options and spreads are not simulated.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime

from ingest.sim.numbers import decimals_of

INST_TYPES = ("SPOT", "MARGIN", "SWAP", "FUTURES", "OPTION")
_FUTURES_RE = re.compile(r"^(?P<base>[A-Z0-9]+)-(?P<quote>[A-Z0-9]+)-(?P<date>\d{6})$")
_SWAP_RE = re.compile(r"^(?P<base>[A-Z0-9]+)-(?P<quote>[A-Z0-9]+)-SWAP$")
_SPOT_RE = re.compile(r"^(?P<base>[A-Z0-9]+)-(?P<quote>[A-Z0-9]+)$")


@dataclass(frozen=True, slots=True)
class _Coin:
    start_px: str
    tick_sz: str
    spot_lot: str
    spot_min: str
    linear_ct_val: str
    inverse_ct_val: str
    swap_lot: str


_COINS: dict[str, _Coin] = {
    "BTC": _Coin("43250.1", "0.1", "0.00000001", "0.00001", "0.01", "100", "0.01"),
    "ETH": _Coin("2315.42", "0.01", "0.000001", "0.001", "0.1", "10", "0.01"),
    "SOL": _Coin("98.765", "0.001", "0.000001", "0.01", "1", "10", "0.01"),
    "XRP": _Coin("0.5123", "0.0001", "0.000001", "1", "100", "10", "0.01"),
    "DOGE": _Coin("0.08123", "0.00001", "0.000001", "10", "1000", "10", "0.01"),
    "OKB": _Coin("48.12", "0.01", "0.000001", "0.1", "1", "10", "1"),
}
_GENERIC = _Coin("1.2345", "0.0001", "0.000001", "1", "1", "10", "1")


@dataclass(frozen=True, slots=True)
class InstrumentSpec:
    """What the market and the `instruments` REST/WS rows need to know about one instrument."""

    inst_id: str
    inst_type: str
    base_ccy: str
    quote_ccy: str
    settle_ccy: str
    tick_sz: str
    lot_sz: str
    min_sz: str
    start_px: str
    ct_val: str = ""
    ct_mult: str = ""
    ct_val_ccy: str = ""
    ct_type: str = ""
    inst_family: str = ""
    lever: str = "10"
    exp_time: str = ""
    list_time: str = "1606468572000"
    inst_id_code: int = 0
    state: str = "live"

    @property
    def px_dec(self) -> int:
        return decimals_of(self.tick_sz)

    @property
    def sz_dec(self) -> int:
        return decimals_of(self.lot_sz)

    @property
    def is_derivative(self) -> bool:
        return self.inst_type in ("SWAP", "FUTURES")

    @property
    def is_inverse(self) -> bool:
        return self.ct_type == "inverse"

    @property
    def coin(self) -> str:
        """The underlying coin (BTC for BTC-USDT, BTC-USDT-SWAP and BTC-USD-SWAP)."""
        return self.inst_id.split("-")[0]

    def to_okx(self, *, rest: bool = False) -> dict[str, object]:
        """The instrument row of `GET /api/v5/public/instruments` (`rest=True`) or of the `instruments` channel."""
        spot = self.inst_type == "SPOT"
        row: dict[str, object] = {
            "alias": "" if spot or self.inst_type == "SWAP" else "quarter",
            "auctionEndTime": "",
            "baseCcy": self.base_ccy if spot else "",
            "category": "1",
            "ctMult": self.ct_mult,
            "ctType": self.ct_type,
            "ctVal": self.ct_val,
            "ctValCcy": self.ct_val_ccy,
            "contTdSwTime": self.list_time,
            "expTime": self.exp_time,
            "futureSettlement": False,
            "instFamily": self.inst_family,
            "instId": self.inst_id,
            "instType": self.inst_type,
            "lever": self.lever,
            "listTime": self.list_time,
            "lotSz": self.lot_sz,
            "maxIcebergSz": "9999999999.0000000000000000",
            "maxLmtAmt": "1000000",
            "maxLmtSz": "9999999999",
            "maxMktAmt": "1000000",
            "maxMktSz": "" if spot else "10000",
            "maxStopSz": "" if spot else "10000",
            "maxTriggerSz": "9999999999.0000000000000000",
            "maxTwapSz": "9999999999.0000000000000000",
            "minSz": self.min_sz,
            "optType": "",
            "openType": "call_auction" if spot else "",
            "quoteCcy": self.quote_ccy if spot else "",
            "settleCcy": self.settle_ccy,
            "state": self.state,
            "ruleType": "normal",
            "stk": "",
            "tickSz": self.tick_sz,
            "uly": self.inst_family,
            "instIdCode": self.inst_id_code,
        }
        if rest:
            # The REST row carries the quote currencies tradable against (2025 docs); the channel row does not.
            keys = list(row)
            keys.insert(keys.index("quoteCcy") + 1, "tradeQuoteCcyList")
            row["tradeQuoteCcyList"] = [self.quote_ccy] if spot else []
            row = {k: row[k] for k in keys}
        return row


def _exp_time_ms(date: str) -> str:
    dt = datetime(2000 + int(date[:2]), int(date[2:4]), int(date[4:6]), 8, 0, tzinfo=UTC)
    return str(int(dt.timestamp() * 1000))


def spec_for(inst_id: str) -> InstrumentSpec:
    """The spec of `inst_id`, derived from its form; ValueError for forms the simulator does not trade."""
    code = zlib.crc32(inst_id.encode()) % 1_000_000_000 + 1_000_000_000
    m = _SWAP_RE.match(inst_id) or _FUTURES_RE.match(inst_id)
    if m is not None:
        base, quote = m.group("base"), m.group("quote")
        coin = _COINS.get(base, _GENERIC)
        inverse = quote == "USD"
        family = f"{base}-{quote}"
        futures = "date" in m.groupdict()
        return InstrumentSpec(
            inst_id=inst_id,
            inst_type="FUTURES" if futures else "SWAP",
            base_ccy=base,
            quote_ccy=quote,
            settle_ccy=base if inverse else quote,
            tick_sz=coin.tick_sz,
            lot_sz="1" if inverse else coin.swap_lot,
            min_sz="1" if inverse else coin.swap_lot,
            start_px=coin.start_px,
            ct_val=coin.inverse_ct_val if inverse else coin.linear_ct_val,
            ct_mult="1",
            ct_val_ccy=quote if inverse else base,
            ct_type="inverse" if inverse else "linear",
            inst_family=family,
            lever="100",
            exp_time=_exp_time_ms(m.group("date")) if futures else "",
            inst_id_code=code,
        )
    m = _SPOT_RE.match(inst_id)
    if m is None:
        raise ValueError(f"the simulator trades SPOT (BTC-USDT), SWAP (BTC-USDT-SWAP) and FUTURES "
                         f"(BTC-USD-261225) instruments, not {inst_id!r}")
    base, quote = m.group("base"), m.group("quote")
    coin = _COINS.get(base, _GENERIC)
    return InstrumentSpec(
        inst_id=inst_id,
        inst_type="SPOT",
        base_ccy=base,
        quote_ccy=quote,
        settle_ccy="",
        tick_sz=coin.tick_sz,
        lot_sz=coin.spot_lot,
        min_sz=coin.spot_min,
        start_px=coin.start_px,
        inst_id_code=code,
    )
