"""REST reconciliation of the private streams after every (re)connect, so the private record has no hole.

The pipeline asks for a read (`request_reconcile`, never blocking) when a private stream comes up for the
first time, is lost, or is refused. This task coalesces the requests that arrive together (one reconnect
acks several args), reads the account over signed REST, and puts one `RestRecords` into the pipeline's
queue. There the same private state that judges the pushes decides what is news (`core/ledger.py`), so
only what the streams missed is published, with `source = rest`.

What the read adds, per channel:

* `orders`: OKX sends no snapshot on subscribe, so an order placed, filled, amended or canceled in the hole
  would be missing. Read: `orders-pending` (every open order; at start-up the baseline of orders placed
  before the daemon ran) and `orders-history` per instType, created since the earlier of the hole's start
  and the oldest order the record still shows open (it may have completed in the hole), keeping the rows
  that changed since the hole began. Each order's latest state is published once; its intermediate
  states in the hole cannot be read back from OKX.
* fills: `/trade/fills` since the hole's start: every fill once, keyed (instId, tradeId). While the `fills`
  channel is recorded they complete okx.fills; otherwise fills the `orders` stream already carried (a push
  with the tradeId) are on record and dropped, and the ones it missed land on okx.fills.
* `positions`, `account`, `balance_and_position`: OKX resends their full state on every subscribe; that
  snapshot is the reconciliation (their intermediate changes in the hole cannot be read back anywhere).
  REST positions and balances are read too and published only while the snapshot channel is not held
  (refused, channel-conn-count-error), so the current state is on record either way.
* `orders-algo` (business endpoint) is not reconciled: its REST views need an ordType per request and are
  not served by the simulator yet; a hole in it stays an open gap.

A read that fails for a transient reason (network, 5xx, rate limit, paused auth) is retried with backoff,
merged with any request that arrived meanwhile; a read OKX refuses for good is logged and counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from ingest.core.backoff import full_jitter
from ingest.core.clock import ServerClock
from ingest.core.events import Inbound, ReconcileRequest, RestRecords
from ingest.core.normalize import balances_from_rest, fill_from_rest, order_from_rest, position_from_rest
from ingest.core.records import DeadLetter, OkxRecord
from ingest.errors import IngestError
from ingest.io.rest import OkxRestClient, QueryValue

log = logging.getLogger(__name__)

ORDERS_PENDING_PATH = "/api/v5/trade/orders-pending"
ORDERS_HISTORY_PATH = "/api/v5/trade/orders-history"
FILLS_PATH = "/api/v5/trade/fills"
POSITIONS_PATH = "/api/v5/account/positions"
BALANCE_PATH = "/api/v5/account/balance"

#: orders-history needs an instType (SPEC 8.3).
INST_TYPES = ("SPOT", "MARGIN", "SWAP", "FUTURES", "OPTION")
#: How far back OKX's REST views reach (SPEC 8.3): a hole older than this cannot be read back completely.
FILLS_HORIZON_MS = 3 * 24 * 3600 * 1000
ORDERS_HISTORY_HORIZON_MS = 7 * 24 * 3600 * 1000
#: The channels whose hole calls for reading orders and fills, positions, balances.
_ORDER_CHANNELS = frozenset({"orders", "fills"})
_POSITION_CHANNELS = frozenset({"positions"})
_BALANCE_CHANNELS = frozenset({"account"})

Row = dict[str, object]


def merge(a: ReconcileRequest, b: ReconcileRequest) -> ReconcileRequest:
    """One request that covers both: the earlier start, every arg, the latest seq."""
    opens = [t for t in (a.open_since_ms, b.open_since_ms) if t is not None]
    reasons = a.reason if b.reason in a.reason else f"{a.reason}; {b.reason}"
    return ReconcileRequest(seq=max(a.seq, b.seq), reason=reasons[:1000], since_ns=min(a.since_ns, b.since_ns),
                            args=a.args | b.args, open_since_ms=min(opens) if opens else None,
                            initial=a.initial or b.initial)


@dataclass
class ReconcileStats:
    """Counters for metrics and tests."""

    requests: int = 0
    reads: int = 0
    failures: int = 0
    rows: Counter[str] = field(default_factory=Counter)
    last_seq: int = 0
    last_error: str | None = None


class PrivateReconciler:
    """Reads the private account over REST when the pipeline asks, and feeds the rows back into its queue.

    Implements `core.events.Reconciler`. Owned by the supervisor (one task: `run`).
    """

    def __init__(
        self,
        rest: OkxRestClient,
        clock: ServerClock,
        inbox: asyncio.Queue[Inbound],
        *,
        margin_ms: int = 60_000,
        settle_s: float = 0.25,
        page_limit: int = 100,
        max_pages: int = 200,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 60.0,
        now_ns: Callable[[], int] = time.time_ns,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._rest = rest
        self._clock = clock
        self._inbox = inbox
        self._margin_ms = margin_ms
        self._settle_s = settle_s
        self._page_limit = page_limit
        self._max_pages = max_pages
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._now_ns = now_ns
        self._sleep = sleep
        self._pending: ReconcileRequest | None = None
        self._reading = False
        self._wanted = asyncio.Event()
        self.stats = ReconcileStats()

    # ---- the pipeline's side ------------------------------------------------------------------------

    def request_reconcile(self, request: ReconcileRequest) -> None:
        """Ask for a read covering `request` (merged with any not yet started); returns at once."""
        self.stats.requests += 1
        self._pending = request if self._pending is None else merge(self._pending, request)
        self._wanted.set()

    @property
    def pending(self) -> bool:
        """True while a requested read waits or runs."""
        return self._pending is not None or self._reading

    # ---- the task -----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve requests until cancelled; a failing read is retried with backoff, never raised."""
        try:
            await self._serve()
        except asyncio.CancelledError:
            if self._pending is not None:
                self._abandoned(self._pending)
            raise

    async def _serve(self) -> None:
        delays: Iterator[float] | None = None
        while True:
            await self._wanted.wait()
            # The acks of one subscribe batch arrive within moments: let them in, then read once for all.
            await self._sleep(self._settle_s)
            self._wanted.clear()
            request, self._pending = self._pending, None
            if request is None:
                continue
            self._reading = True
            try:
                batch = await self.read(request)
                await self._inbox.put(batch)  # the pipeline's queue is bounded: wait like the sockets do
            except asyncio.CancelledError:
                self._abandoned(request)
                raise
            except IngestError as exc:
                self.stats.failures += 1
                self.stats.last_error = str(exc)
                if not exc.retriable:
                    delays = None
                    log.error("private_reconcile_failed", extra={
                        "seq": request.seq, "reason": request.reason[:300], "error": str(exc), "retry": False,
                        "fix": "the private record may miss what happened while the stream was down; check the "
                               "key's read permission and the error, then restart or resubscribe"})
                    # Tell the pipeline, so it keeps those holes open instead of reporting them filled.
                    await self._inbox.put(RestRecords(
                        seq=request.seq, reason=f"{request.reason}: failed: {exc}", ts_ns=self._now_ns(),
                        since_ms=request.since_ns // 1_000_000, fetched_ms=self._clock.now_ms(),
                        covers=tuple(sorted(request.args)), records=(), failed=True))
                    continue
                delays = delays or full_jitter(self._retry_initial_s, self._retry_max_s)
                wait = next(delays)
                log.warning("private_reconcile_retry", extra={"seq": request.seq, "error": str(exc),
                                                              "retry_in_s": round(wait, 3)})
                self._pending = request if self._pending is None else merge(request, self._pending)
                await self._sleep(wait)
                self._wanted.set()
                continue
            finally:
                self._reading = False
            delays = None
            self.stats.reads += 1
            self.stats.last_seq = request.seq
            self.stats.last_error = None

    def _abandoned(self, request: ReconcileRequest) -> None:
        """Shutdown interrupted a read: say which hole stays unreconciled (the next start reads only its own)."""
        log.warning("private_reconcile_abandoned", extra={"seq": request.seq, "reason": request.reason[:300],
                                                          "since_ns": request.since_ns})

    async def read(self, request: ReconcileRequest) -> RestRecords:
        """One read of everything `request` needs, as the records the streams would have carried."""
        fetched_ms = self._clock.now_ms()
        since_ms = request.since_ns // 1_000_000 + self._clock.offset_ms - self._margin_ms
        channels = {arg.channel for arg in request.args}
        records: list[OkxRecord | DeadLetter] = []
        if channels & _ORDER_CHANNELS:
            self._warn_beyond_horizon(since_ms, fetched_ms, request)
            begin = since_ms if request.open_since_ms is None else min(since_ms, request.open_since_ms)
            records += await self._orders(since_ms, begin)
            records += await self._fills(since_ms)
        if channels & _POSITION_CHANNELS:
            records += await self._rows(POSITIONS_PATH, {}, "positions")
        if channels & _BALANCE_CHANNELS:
            records += await self._rows(BALANCE_PATH, {}, "balances")
        log.info("private_reconcile_read", extra={
            "seq": request.seq, "reason": request.reason[:300], "initial": request.initial, "since_ms": since_ms,
            "channels": sorted(channels), "rows": len(records)})
        return RestRecords(seq=request.seq, reason=request.reason, ts_ns=self._now_ns(), since_ms=since_ms,
                           fetched_ms=fetched_ms, covers=tuple(sorted(request.args)), records=tuple(records))

    # ---- reads --------------------------------------------------------------------------------------

    async def _orders(self, since_ms: int, begin_ms: int) -> list[OkxRecord | DeadLetter]:
        rows = await self._pages(ORDERS_PENDING_PATH, {}, "ordId")
        for inst_type in INST_TYPES:
            history = await self._pages(ORDERS_HISTORY_PATH, {"instType": inst_type, "begin": begin_ms}, "ordId")
            # Completed before the hole: already on record (or, before start-up, not this run's business).
            rows += [r for r in history if _int(r.get("uTime")) >= since_ms]
        return self._build(rows, "orders", _order_key)

    async def _fills(self, since_ms: int) -> list[OkxRecord | DeadLetter]:
        rows = await self._pages(FILLS_PATH, {"begin": since_ms}, "billId")
        return self._build(rows, "fills", lambda r: (_int(r.get("ts")), _int(r.get("billId"))))

    async def _rows(self, path: str, params: dict[str, QueryValue], kind: str) -> list[OkxRecord | DeadLetter]:
        rows = await self._rest.get(path, params)
        return self._build(rows, kind, None)

    async def _pages(self, path: str, params: dict[str, QueryValue], cursor: str) -> list[Row]:
        """Every row of a newest-first list, walking back with `after=<oldest cursor of the last page>`."""
        out: list[Row] = []
        query: dict[str, QueryValue] = {**params, "limit": self._page_limit}
        for _ in range(self._max_pages):
            page = await self._rest.get(path, query)
            out += page
            last = page[-1].get(cursor) if page else None
            if len(page) < self._page_limit or not isinstance(last, str) or not last:
                return out
            query = {**query, "after": last}
        log.error("private_reconcile_truncated", extra={
            "path": path, "rows": len(out), "max_pages": self._max_pages,
            "fix": "more rows than one reconciliation reads; older ones in the hole may be missing from the record"})
        return out

    def _build(self, rows: list[Row], kind: str, key: Callable[[Row], tuple[int, int]] | None,
               ) -> list[OkxRecord | DeadLetter]:
        """Rows -> records in the order the stream would have carried them (oldest change first)."""
        self.stats.rows[kind] += len(rows)
        if key is not None:
            rows = sorted(rows, key=key)
        recv_ts_ns = self._now_ns()
        out: list[OkxRecord | DeadLetter] = []
        for row in rows:
            if kind == "orders":
                out.append(order_from_rest(row, recv_ts_ns=recv_ts_ns))
            elif kind == "fills":
                out.append(fill_from_rest(row, recv_ts_ns=recv_ts_ns))
            elif kind == "positions":
                out.append(position_from_rest(row, recv_ts_ns=recv_ts_ns))
            else:
                balances = balances_from_rest(row, recv_ts_ns=recv_ts_ns)
                out.extend(balances if isinstance(balances, tuple) else (balances,))
        return out

    def _warn_beyond_horizon(self, since_ms: int, fetched_ms: int, request: ReconcileRequest) -> None:
        if request.initial or fetched_ms - since_ms <= FILLS_HORIZON_MS:
            return
        log.error("private_reconcile_beyond_horizon", extra={
            "since_ms": since_ms, "hole_s": (fetched_ms - since_ms) // 1000,
            "fills_horizon_s": FILLS_HORIZON_MS // 1000, "orders_horizon_s": ORDERS_HISTORY_HORIZON_MS // 1000,
            "fix": "the hole is older than OKX's REST fills/orders history: the start of it cannot be read back"})


def _int(value: object) -> int:
    return int(value) if isinstance(value, str) and value.isdigit() else 0


def _order_key(row: Row) -> tuple[int, int]:
    return _int(row.get("uTime")), _int(row.get("ordId"))

