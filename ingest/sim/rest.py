"""OKX's REST API as the simulator serves it: signed like OKX, limited like OKX, answering from the same
trade log, book and account that the WebSocket side pushes.

Order of checks per request: faults (slow, held, 5xx, injected 50011), then for private endpoints the signature
(HTTP 401, body without `data`), then the endpoint's sliding-window limit (50011 as HTTP 429 or 200), then
the parameters. Paging follows SPEC 8.3: newest first, `after` = older than the cursor, `before` = newer,
both exclusive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import orjson
from aiohttp import web

from ingest.core.ratelimit import SlidingWindow
from ingest.okx import codes
from ingest.okx.channels import CANDLE_BARS
from ingest.okx.endpoints import DEMO_HEADER
from ingest.okx.signing import parse_rest_timestamp, rest_sign, verify
from ingest.sim import frames
from ingest.sim.account import FILL_REST_KEYS, Fill, Order, pick
from ingest.sim.candles import CandleMath
from ingest.sim.config import KeyEnv, RateLimitHttp
from ingest.sim.instruments import INST_TYPES
from ingest.sim.market import InstrumentMarket
from ingest.sim.stats import RestRecord

if TYPE_CHECKING:
    from ingest.sim.hub import Hub

T = TypeVar("T")
Json = dict[str, object]
_DAY_MS = 24 * 3600 * 1000
NOT_FOUND_BODY = {"code": 404, "data": {}, "detailMsg": "", "error_code": "404", "error_message": "Not Found",
                  "msg": "Not Found"}
RATE_LIMIT_200_MSG = "Rate limit reached. Please refer to API documentation and throttle requests accordingly."


@dataclass(frozen=True, slots=True)
class RestError(Exception):
    """An OKX error answer: `{"code","msg","data":[]}` with HTTP `status`, or without `data` when `auth`."""

    code: str
    msg: str
    status: int = 200
    auth: bool = False


def _param_error(name: str) -> RestError:
    return RestError(codes.PARAM_ERROR, f"Parameter {name} error")


def _required(query: dict[str, str], name: str) -> str:
    value = query.get(name, "")
    if not value:
        raise RestError(codes.PARAM_EMPTY, f"Parameter {name} can not be empty.", 400)
    return value


def _int(query: dict[str, str], name: str) -> int | None:
    value = query.get(name, "")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise _param_error(name) from None


def _limit(query: dict[str, str], default: int, maximum: int) -> int:
    value = _int(query, "limit")
    if value is None:
        return default
    if value <= 0:
        raise _param_error("limit")
    return min(value, maximum)


def page_by_key(items: list[T], key: Callable[[T], int], after: int | None, before: int | None,
                limit: int) -> list[T]:
    """SPEC 8.3 paging over items with increasing ids: newest first, the `limit` nearest `after` (or, with
    only `before`, nearest `before`)."""
    chosen = sorted((x for x in items if (after is None or key(x) < after) and (before is None or key(x) > before)),
                    key=key)
    chosen = chosen[:limit] if before is not None and after is None else chosen[-limit:]
    return chosen[::-1]


class RestApi:
    """The REST endpoints; `handle` is the aiohttp catch-all handler."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.config = hub.config
        self.clock = hub.clock
        self.market = hub.market
        self.account = hub.account
        self.stats = hub.stats
        self._windows: dict[tuple[str, ...], SlidingWindow] = {}
        self._alternate = 0
        self._math: dict[str, CandleMath] = {}
        self.public: dict[str, Callable[[dict[str, str]], list[object]]] = {
            "/api/v5/public/time": self._time,
            "/api/v5/public/instruments": self._instruments,
            "/api/v5/market/trades": self._trades,
            "/api/v5/market/history-trades": self._history_trades,
            "/api/v5/market/books": self._books,
            "/api/v5/market/candles": self._candles,
            "/api/v5/market/history-candles": self._history_candles,
            "/api/v5/public/funding-rate-history": self._funding_rate_history,
        }
        self.private: dict[str, Callable[[dict[str, str]], list[object]]] = {
            "/api/v5/trade/fills": self._fills,
            "/api/v5/trade/fills-history": self._fills_history,
            "/api/v5/trade/orders-history": self._orders_history,
            "/api/v5/trade/orders-pending": self._orders_pending,
            "/api/v5/account/config": self._config,
            "/api/v5/account/balance": self._balance,
            "/api/v5/account/positions": self._positions,
        }

    # --- dispatch -----------------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.Response:
        path = request.path
        self.stats.rest_requests[path] += 1
        self.hub.watch.notify()  # waits on arrival (`wait_rest`) wake now, not only once it is answered
        body = await request.text()
        key = request.headers.get("OK-ACCESS-KEY", "")
        response = await self._answer(request, path, body, key)
        code = ""
        if response.text and response.content_type == "application/json":
            try:
                parsed = orjson.loads(response.text)
                code = str(parsed.get("code", "")) if isinstance(parsed, dict) else ""
            except orjson.JSONDecodeError:
                code = ""
        demo = request.headers.get(DEMO_HEADER[0], "") == DEMO_HEADER[1]
        self.stats.rest_log.append(RestRecord(request.method, path, request.query_string, response.status, code,
                                              key, demo))
        self.hub.watch.notify()
        return response

    async def _answer(self, request: web.Request, path: str, body: str, key: str) -> web.Response:
        for rule in self.hub.faults.take_rest(path):
            if rule.action == "slow":
                await self.hub.timer.sleep(rule.delay_s)
            elif rule.action == "hold":
                await self.hub.faults.hold_rest(path)
            elif rule.action == "error":
                self.stats.rest_injected[path] += 1
                if rule.body is not None:
                    return web.Response(status=rule.status, text=rule.body)
                return self._json({"msg": rule.msg, "code": rule.code}, rule.status)
            elif rule.action == "rate_limit":
                self.stats.rest_injected[path] += 1
                return self._rate_limited(rule.status or None)
        handler = self.public.get(path)
        private = handler is None
        if private:
            handler = self.private.get(path)
        if handler is None or request.method != "GET":
            return self._json(NOT_FOUND_BODY, 404)
        query = dict(request.query)
        try:
            if private:
                self._authenticate(request, body)
            limited = self._over_limit(path, request, key if private else None, query)
            if limited is not None:
                return limited
            data = handler(query)
        except RestError as err:
            if err.auth:
                return self._json({"msg": err.msg, "code": err.code}, err.status)
            return self._json({"code": err.code, "msg": err.msg, "data": []}, err.status)
        return self._json({"code": "0", "msg": "", "data": data}, 200)

    @staticmethod
    def _json(body: object, status: int) -> web.Response:
        return web.Response(status=status, text=orjson.dumps(body).decode(), content_type="application/json")

    def _rate_limited(self, status: int | None = None) -> web.Response:
        if status is None:
            mode = self.config.rate_limit_http
            if mode is RateLimitHttp.ALTERNATE:
                self._alternate += 1
                status = 429 if self._alternate % 2 else 200
            else:
                status = int(mode.value)
        if status == 429:
            return self._json({"msg": "Too Many Requests", "code": codes.RATE_LIMITED}, 429)
        return self._json({"code": codes.RATE_LIMITED, "msg": RATE_LIMIT_200_MSG, "data": []}, status)

    def _over_limit(self, path: str, request: web.Request, key: str | None,
                    query: dict[str, str]) -> web.Response | None:
        limit = self.config.rest_limit(path)
        if limit is None:
            return None
        ip = request.remote or "unknown"
        scope: tuple[str, ...] = (path, key or ip)
        if limit.per == "ip+instType":
            scope = (path, ip, query.get("instType", ""))
        elif limit.per == "ip+instId":
            scope = (path, ip, query.get("instId", ""))
        window = self._windows.get(scope)
        if window is None:
            window = self._windows[scope] = SlidingWindow(limit.limit, limit.window_s)
        now = self.hub.timer.now()
        if not window.try_acquire(now):
            self.stats.rest_violations[path] += 1
            return self._rate_limited()
        self.stats.rest_peak[path] = max(self.stats.rest_peak.get(path, 0), window.used(now))
        return None

    def _authenticate(self, request: web.Request, body: str) -> None:
        """SPEC 8.1: OK-ACCESS-* headers, ISO-8601 ms timestamp within 30 s, prehash
        timestamp + METHOD + path?query (as sent) + body."""
        h = request.headers
        key, sign = h.get("OK-ACCESS-KEY", ""), h.get("OK-ACCESS-SIGN", "")
        ts, passphrase = h.get("OK-ACCESS-TIMESTAMP", ""), h.get("OK-ACCESS-PASSPHRASE", "")
        if not key:
            raise RestError(codes.KEY_HEADER_EMPTY, 'Request header "OK-ACCESS-KEY" cannot be empty.', 401, True)
        if not passphrase:
            raise RestError(codes.PASSPHRASE_HEADER_EMPTY, 'Request header "OK-ACCESS-PASSPHRASE" cannot be empty.',
                            401, True)
        if not sign:
            raise RestError(codes.SIGN_HEADER_EMPTY, 'Request header "OK-ACCESS-SIGN" cannot be empty.', 401, True)
        if not ts:
            raise RestError(codes.TIMESTAMP_HEADER_EMPTY, 'Request header "OK-ACCESS-TIMESTAMP" cannot be empty.',
                            401, True)
        try:
            ts_ms = parse_rest_timestamp(ts)
        except ValueError:
            raise RestError(codes.INVALID_ACCESS_TIMESTAMP, "Invalid OK-ACCESS-TIMESTAMP", 401, True) from None
        cfg = self.config
        if abs(self.clock.now_ms() - ts_ms) > cfg.auth_window_s * 1000:
            raise RestError(codes.REST_TIMESTAMP_EXPIRED, "Timestamp request expired", 401, True)
        if not cfg.has_credentials or key != cfg.api_key:
            raise RestError(codes.INVALID_ACCESS_KEY, "Invalid OK-ACCESS-KEY", 401, True)
        demo = h.get(DEMO_HEADER[0], "") == DEMO_HEADER[1]
        if demo != (cfg.key_env is KeyEnv.DEMO):
            raise RestError(codes.ENV_MISMATCH, "APIKey does not match current environment.", 401, True)
        if passphrase != cfg.passphrase:
            raise RestError(codes.WRONG_REST_PASSPHRASE, 'Request header "OK-ACCESS-PASSPHRASE" incorrect.', 401,
                            True)
        expected = rest_sign(cfg.api_secret, ts, request.method, request.raw_path, body)
        if not verify(expected, sign):
            raise RestError(codes.INVALID_SIGNATURE, "Invalid Sign", 401, True)

    def _inst(self, query: dict[str, str]) -> InstrumentMarket:
        inst_id = _required(query, "instId")
        m = self.market.instruments.get(inst_id)
        if m is None:
            raise RestError(codes.INSTRUMENT_NOT_EXIST, "Instrument ID, Instrument ID code, or Spread ID doesn't "
                                                        "exist.")
        return m

    # --- public ----------------------------------------------------------------------------------------------
    def _time(self, query: dict[str, str]) -> list[object]:
        return [{"ts": str(self.clock.now_ms())}]

    def _instruments(self, query: dict[str, str]) -> list[object]:
        inst_type = _required(query, "instType")
        if inst_type not in INST_TYPES:
            raise _param_error("instType")
        inst_id, family = query.get("instId"), query.get("instFamily")
        return [spec.to_okx(rest=True) for spec in self.market.specs()
                if spec.inst_type == inst_type and (not inst_id or spec.inst_id == inst_id)
                and (not family or spec.inst_family == family)]

    def _trades(self, query: dict[str, str]) -> list[object]:
        m = self._inst(query)
        limit = _limit(query, 100, 500)
        return [row.to_okx() for row in m.log.newest_first(0, len(m.log), limit)]

    def _history_trades(self, query: dict[str, str]) -> list[object]:
        m = self._inst(query)
        kind = query.get("type", "1") or "1"
        if kind not in ("1", "2"):
            raise _param_error("type")
        after, before = _int(query, "after"), _int(query, "before")
        limit = _limit(query, 100, 100)
        log = m.log
        if kind == "2":
            if before is not None:
                raise RestError(codes.BEFORE_WITH_TS_PAGINATION,
                                "Parameter before isn't supported for timestamp pagination")
            hi = log.index_ts(after) if after is not None else len(log)
            rows = log.newest_first(0, hi, limit)
        else:
            hi = log.index_of_id(after) if after is not None else len(log)
            lo = log.index_after_id(before) if before is not None else 0
            # SPEC 8.3: `before` alone returns the latest trades newer than it.
            rows = log.newest_first(lo, hi, limit)
        return [row.to_okx() for row in rows]

    def _funding_rate_history(self, query: dict[str, str]) -> list[object]:
        """OKX v5 "Get funding rate history": settled rates of a SWAP, newest first, paged by fundingTime
        (`after` older, `before` newer, both exclusive), limit max 400 (default 400), the last 3 months."""
        m = self._inst(query)
        if m.spec.inst_type != "SWAP":
            raise _param_error("instId")
        after, before = _int(query, "after"), _int(query, "before")
        limit = _limit(query, 400, 400)
        horizon = self.market.now_ms() - 90 * _DAY_MS
        rows = [s for s in m.settlements if s.funding_time >= horizon]
        return [s.to_okx(m.spec.inst_id) for s in page_by_key(rows, lambda s: s.funding_time, after, before, limit)]

    def _books(self, query: dict[str, str]) -> list[object]:
        m = self._inst(query)
        size = _int(query, "sz") or 1
        if size <= 0:
            raise _param_error("sz")
        size = min(size, 400)
        return [{"asks": frames.level_rows(m, m.book.top(False, size)),
                 "bids": frames.level_rows(m, m.book.top(True, size)),
                 "ts": str(m.ts or self.market.now_ms()), "seqId": m.book_seq}]

    def _candle_rows(self, query: dict[str, str], max_bars: int | None) -> list[object]:
        m = self._inst(query)
        bar = query.get("bar") or "1m"
        if bar not in CANDLE_BARS:
            raise _param_error("bar")
        math = self._math.get(m.spec.inst_id)
        if math is None:
            math = self._math[m.spec.inst_id] = CandleMath(m.spec)
        rows = math.page(m.log, bar, self.market.now_ms(), _int(query, "after"), _int(query, "before"),
                         _limit(query, 100, 300), max_bars)
        return list(rows)

    def _candles(self, query: dict[str, str]) -> list[object]:
        return self._candle_rows(query, 1440)

    def _history_candles(self, query: dict[str, str]) -> list[object]:
        return self._candle_rows(query, None)

    # --- private ---------------------------------------------------------------------------------------------
    def _fill_rows(self, query: dict[str, str], days: int) -> list[object]:
        inst_type, inst_id, ord_id = query.get("instType"), query.get("instId"), query.get("ordId")
        begin, end = _int(query, "begin"), _int(query, "end")
        fills = [f for f in self.account.fills_since(self.market.now_ms() - days * _DAY_MS)
                 if (not inst_type or f.inst_type == inst_type) and (not inst_id or f.inst_id == inst_id)
                 and (not ord_id or f.ord_id == ord_id) and (begin is None or f.ts >= begin)
                 and (end is None or f.ts <= end)]
        page = page_by_key(fills, _bill_id, _int(query, "after"), _int(query, "before"), _limit(query, 100, 100))
        return [pick(self.account.fill_values(f), FILL_REST_KEYS) for f in page]

    def _fills(self, query: dict[str, str]) -> list[object]:
        return self._fill_rows(query, 3)

    def _fills_history(self, query: dict[str, str]) -> list[object]:
        _required(query, "instType")
        return self._fill_rows(query, 90)

    def _orders_history(self, query: dict[str, str]) -> list[object]:
        inst_type = _required(query, "instType")
        inst_id, ord_type, state = query.get("instId"), query.get("ordType"), query.get("state")
        begin, end = _int(query, "begin"), _int(query, "end")
        orders = [o for o in self.account.order_history(self.market.now_ms())
                  if o.inst_type == inst_type and (not inst_id or o.inst_id == inst_id)
                  and (not ord_type or o.ord_type == ord_type) and (not state or o.state == state)
                  and (begin is None or o.c_time >= begin) and (end is None or o.c_time <= end)]
        page = page_by_key(orders, _ord_id, _int(query, "after"), _int(query, "before"), _limit(query, 100, 100))
        return [self.account.order_history_row(o) for o in page]

    def _orders_pending(self, query: dict[str, str]) -> list[object]:
        """Open orders (live, partially_filled), newest first, paged by ordId like orders-history."""
        inst_type, inst_id = query.get("instType"), query.get("instId")
        ord_type, state = query.get("ordType"), query.get("state")
        orders = [o for o in self.account.orders.values()
                  if not o.final and (not inst_type or o.inst_type == inst_type)
                  and (not inst_id or o.inst_id == inst_id) and (not ord_type or o.ord_type == ord_type)
                  and (not state or o.state == state)]
        page = page_by_key(orders, _ord_id, _int(query, "after"), _int(query, "before"), _limit(query, 100, 100))
        return [self.account.order_history_row(o) for o in page]

    def _config(self, query: dict[str, str]) -> list[object]:
        cfg = self.config
        return [{
            "acctLv": "2", "acctStpMode": "cancel_maker", "autoLoan": False, "ctIsoMode": "automatic",
            "enableSpotBorrow": False, "greeksType": "PA", "ip": "", "type": "0", "kycLv": "3",
            "label": "okx-ingest simulator", "level": "Lv1", "levelTmp": "", "liquidationGear": "-1",
            "mainUid": cfg.uid, "mgnIsoMode": "automatic", "opAuth": "1", "perm": cfg.perm, "posMode": "net_mode",
            "roleType": "0", "spotBorrowAutoRepay": False, "spotOffsetType": "", "spotRoleType": "0",
            "spotTraderInsts": [], "traderInsts": [], "uid": cfg.uid,
        }]

    def _balance(self, query: dict[str, str]) -> list[object]:
        ccy = query.get("ccy")
        return [self.account.balance_rest_row(set(ccy.split(",")) if ccy else None)]

    def _positions(self, query: dict[str, str]) -> list[object]:
        inst_id = query.get("instId")
        return list(self.account.positions_rest_rows(query.get("instType") or None,
                                                     set(inst_id.split(",")) if inst_id else None))


def _bill_id(f: Fill) -> int:
    return int(f.bill_id)


def _ord_id(o: Order) -> int:
    return int(o.ord_id)
