"""One WebSocket frame -> validated records, an OKX event, or a dead letter. Never an exception, never a drop.

`normalize(frame)` is the pipeline's entry point. It parses the frame once (msgspec, with JSON floats kept as
exact Decimals and big integers kept whole, so unknown fields survive byte-exact in meaning), tells events
from data pushes, checks every push against its channel's shape (required fields present, strings where OKX
sends strings, decimal strings finite, integers where OKX sends integers and within the range of the Avro
type that carries them (tradeIds too: gap bounds hold them as longs), candle arrays of the right length, a
channel we have a record for) and returns typed records whose common fields come from the frame. Anything
else becomes a `DeadLetter` that keeps the frame's bytes and says what was wrong where. A frame is all or
nothing: one bad row dead-letters the whole frame, so a re-normalized frame never duplicates half of itself.

The `*_from_rest` builders turn REST rows into records of exactly the same schema and key as the stream's,
with `source="rest"` and `recordId = rest:{channel}:{natural id}`.

The package is split along its seams: `results` (what normalize returns), `checks` (the reference validator's
building blocks), `specs` (OKX field kinds per record), `reference` (the reference path every frame can take),
`fast` (the msgspec fast paths of trades and books), `raw` (okx.raw batching) and `rest` (REST row builders).
"""

from __future__ import annotations

from ingest.core.events import InboundFrame
from ingest.core.normalize.checks import _Kind as _Kind
from ingest.core.normalize.checks import _Spec as _Spec
from ingest.core.normalize.fast import _FAST_PATHS as _FAST_PATHS
from ingest.core.normalize.fast import _FAST_PREFIX, _TEMPLATES
from ingest.core.normalize.raw import RAW_ENTRY_OVERHEAD, raw_frames
from ingest.core.normalize.reference import _ROW_HANDLERS as _ROW_HANDLERS
from ingest.core.normalize.reference import _SUBARG_CACHE, _dead, frame_dead_letter, push_arg, supports
from ingest.core.normalize.reference import _normalize as _normalize
from ingest.core.normalize.rest import (
    algo_order_from_rest,
    balances_from_rest,
    book_from_rest,
    candle_from_rest,
    fill_from_rest,
    funding_rate_from_rest,
    instrument_from_rest,
    order_from_rest,
    position_from_rest,
    trade_from_rest,
)
from ingest.core.normalize.results import (
    BookPush,
    EventName,
    Normalized,
    OkxEvent,
    RecordPush,
    TradePush,
    TradeRef,
)
from ingest.core.records import DeadLetterReason

__all__ = [
    "RAW_ENTRY_OVERHEAD", "BookPush", "EventName", "Normalized", "OkxEvent", "RecordPush", "TradePush", "TradeRef",
    "algo_order_from_rest", "balances_from_rest", "book_from_rest", "cache_sizes", "candle_from_rest",
    "fill_from_rest", "frame_dead_letter", "funding_rate_from_rest", "instrument_from_rest", "normalize",
    "order_from_rest", "position_from_rest", "push_arg", "raw_frames", "supports", "trade_from_rest",
]


def cache_sizes() -> dict[str, int]:
    """Entries of the normalizer's per-stream caches (each cleared at 50,000), for the state gauge."""
    return {"normalize_args": len(_SUBARG_CACHE), "normalize_templates": len(_TEMPLATES)}


def normalize(frame: InboundFrame) -> Normalized:
    """Records, an event or a dead letter for one frame. Never raises: even a bug here becomes a dead letter."""
    try:
        data = frame.data
        if data.startswith(_FAST_PREFIX):
            fast = _FAST_PATHS.get(data[19:data.find(b'"', 19)])
            if fast is not None:
                result = fast(frame)
                if result is not None:
                    return result
        return _normalize(frame)
    except Exception as exc:  # a normalizer bug must cost one frame, not the pipeline
        return _dead(frame, DeadLetterReason.INTERNAL_ERROR, f"normalizer error {type(exc).__name__}: {exc}")

