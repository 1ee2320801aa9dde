"""OKX's channel map: which endpoint serves a channel, and what it needs (SPEC section 1.2)."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field


class Endpoint(enum.StrEnum):
    """The three JSON WebSocket endpoints; the value is the URL path."""

    PUBLIC = "/ws/v5/public"
    BUSINESS = "/ws/v5/business"
    PRIVATE = "/ws/v5/private"


CANDLE_BARS: frozenset[str] = frozenset(
    {
        "3M", "1M", "1W", "1D", "2D", "3D", "5D", "12H", "6H", "4H", "2H", "1H", "30m", "15m", "5m", "3m", "1m", "1s",
        "3Mutc", "1Mutc", "1Wutc", "1Dutc", "2Dutc", "3Dutc", "5Dutc", "12Hutc", "6Hutc", "1Yutc",
    }
)
_CANDLE_RE = re.compile(r"^(candle|mark-price-candle|index-candle)(?P<bar>[0-9A-Za-z]+)$")

PUBLIC_CHANNELS: frozenset[str] = frozenset(
    {
        "tickers", "trades", "books", "books5", "bbo-tbt", "books-l2-tbt", "books50-l2-tbt",
        "mark-price", "index-tickers", "funding-rate", "open-interest", "liquidation-orders",
        "price-limit", "instruments", "opt-summary", "estimated-price", "status",
    }
)
BUSINESS_PUBLIC_CHANNELS: frozenset[str] = frozenset({"trades-all"})
BUSINESS_PRIVATE_CHANNELS: frozenset[str] = frozenset({"orders-algo", "algo-advance"})
PRIVATE_CHANNELS: frozenset[str] = frozenset(
    {"account", "positions", "balance_and_position", "orders", "fills", "liquidation-warning", "account-greeks"}
)
#: Public channels that still need a logged-in connection (and VIP4+).
LOGIN_PUBLIC_CHANNELS: frozenset[str] = frozenset({"books-l2-tbt", "books50-l2-tbt"})
#: Depth channels with snapshot + incremental updates chained by seqId/prevSeqId.
INCREMENTAL_BOOK_CHANNELS: frozenset[str] = frozenset({"books", "books-l2-tbt", "books50-l2-tbt"})
#: Depth channels where each push replaces the whole visible book.
SNAPSHOT_BOOK_CHANNELS: frozenset[str] = frozenset({"books5", "bbo-tbt"})
BOOK_CHANNELS: frozenset[str] = INCREMENTAL_BOOK_CHANNELS | SNAPSHOT_BOOK_CHANNELS
#: Private channels capped at 30 connections per channel per sub-account.
CONN_CAPPED_CHANNELS: frozenset[str] = frozenset(
    {"orders", "account", "positions", "balance_and_position", "liquidation-warning", "account-greeks"}
)
#: Channels subscribed by instType rather than instId.
INST_TYPE_CHANNELS: frozenset[str] = frozenset(
    {"liquidation-orders", "instruments", "orders", "positions", "orders-algo", "algo-advance"}
)


#: Instrument types OKX serves a channel for (channels absent here take any type); an arg outside them is
#: refused with 60018 at subscribe time.
CHANNEL_INST_TYPES: dict[str, frozenset[str]] = {
    "funding-rate": frozenset({"SWAP"}),
    "open-interest": frozenset({"SWAP", "FUTURES", "OPTION"}),
    "liquidation-orders": frozenset({"SWAP", "FUTURES", "MARGIN", "OPTION"}),
    "instruments": frozenset({"SPOT", "MARGIN", "SWAP", "FUTURES", "OPTION"}),
}


def inst_type_of(inst_id: str) -> str:
    """The instrument type an instId names by OKX's conventions: `X-Y-SWAP`, `X-Y-YYMMDD` (futures),
    `X-Y-YYMMDD-STRIKE-C|P` (options), else a spot pair."""
    parts = inst_id.split("-")
    if parts[-1] == "SWAP":
        return "SWAP"
    if len(parts) == 5 and parts[-1] in ("C", "P"):
        return "OPTION"
    if len(parts) == 3 and parts[2].isdigit():
        return "FUTURES"
    return "SPOT"


def candle_bar(channel: str) -> str | None:
    """The bar of a candle channel (`candle1m` -> `1m`), or None when it is not a known candle channel."""
    m = _CANDLE_RE.match(channel)
    if m is None or m.group("bar") not in CANDLE_BARS:
        return None
    return m.group("bar")


def is_candle(channel: str) -> bool:
    """True for `candle<bar>`, `mark-price-candle<bar>` and `index-candle<bar>` with a known bar."""
    return candle_bar(channel) is not None


def endpoint_for(channel: str) -> Endpoint | None:
    """The endpoint that serves `channel`, or None for a channel OKX does not have."""
    if channel in PUBLIC_CHANNELS:
        return Endpoint.PUBLIC
    if channel in PRIVATE_CHANNELS:
        return Endpoint.PRIVATE
    if channel in BUSINESS_PUBLIC_CHANNELS or channel in BUSINESS_PRIVATE_CHANNELS or is_candle(channel):
        return Endpoint.BUSINESS
    return None


def requires_login(channel: str) -> bool:
    """True when the connection must be logged in before subscribing to `channel`."""
    return (
        channel in PRIVATE_CHANNELS
        or channel in BUSINESS_PRIVATE_CHANNELS
        or channel in LOGIN_PUBLIC_CHANNELS
    )


def is_depth(channel: str) -> bool:
    """True for the 50/400-level depth channels OKX advises spreading (< 30 per connection)."""
    return channel in INCREMENTAL_BOOK_CHANNELS


_ARG_FIELDS = (("inst_id", "instId"), ("inst_type", "instType"), ("inst_family", "instFamily"), ("ccy", "ccy"),
               ("extra_params", "extraParams"))


@dataclass(frozen=True, slots=True, order=True)
class SubArg:
    """One subscription arg exactly as OKX takes and echoes it; hashable, so it keys per-stream state."""

    channel: str
    inst_id: str | None = None
    inst_type: str | None = None
    inst_family: str | None = None
    ccy: str | None = None
    extra_params: str | None = None
    #: Computed once: every frame looks its stream up in several dicts keyed by SubArg.
    _hash: int = field(init=False, repr=False, compare=False)
    _key: tuple[str | None, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = (self.channel, self.inst_id, self.inst_type, self.inst_family, self.ccy, self.extra_params)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_hash", hash(key))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        # Those dict lookups compare equal args that are distinct objects: one tuple comparison, not six.
        if other.__class__ is SubArg:
            return self._key == other._key
        return NotImplemented

    def __reduce__(self) -> tuple[type[SubArg], tuple[str | None, ...]]:
        # Rebuilt through __init__, so the cached hash is recomputed in the receiving process (str hashes differ).
        return SubArg, (self.channel, self.inst_id, self.inst_type, self.inst_family, self.ccy, self.extra_params)

    def to_okx(self) -> dict[str, str]:
        """The JSON object for a subscribe/unsubscribe request."""
        out = {"channel": self.channel}
        for attr, name in _ARG_FIELDS:
            value = getattr(self, attr)
            if value is not None:
                out[name] = value
        return out

    @classmethod
    def from_okx(cls, arg: Mapping[str, object]) -> SubArg:
        """The arg of an ack or push (`arg.uid` on private pushes is not part of the subscription)."""
        channel = arg.get("channel")
        if not isinstance(channel, str):
            raise ValueError(f"arg without a channel: {arg!r}")
        values = {attr: arg.get(name) for attr, name in _ARG_FIELDS}
        return cls(channel, **{k: v for k, v in values.items() if isinstance(v, str)})

    @property
    def endpoint(self) -> Endpoint | None:
        return endpoint_for(self.channel)

    @property
    def needs_login(self) -> bool:
        return requires_login(self.channel)

    def __str__(self) -> str:
        target = self.inst_id or self.inst_type or self.inst_family or self.ccy or ""
        return f"{self.channel}:{target}" if target else self.channel
