"""REST: OKX's signature checks, error shapes, per-endpoint rate limits (both 50011 forms, counted), paging
semantics of history-trades and candles, and agreement with what the WebSocket pushed."""

from __future__ import annotations

import secrets
from collections import defaultdict
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from ingest.sim import KeyEnv, RateLimitHttp, RestLimit, SimConfig, SimServer
from tests.sim.wsclient import Client, get_json, iso_ms, pushes, rest_headers

BALANCE = "/api/v5/account/balance"


def creds() -> dict[str, Any]:
    return {"api_key": secrets.token_hex(16), "api_secret": secrets.token_hex(32), "passphrase": secrets.token_hex(8)}


async def signed_get(sim: SimServer, path: str, **overrides: Any) -> tuple[int, Any]:
    cfg = sim.config
    args: dict[str, Any] = {"key": cfg.api_key, "secret": cfg.api_secret, "passphrase": cfg.passphrase,
                            "method": "GET", "path_qs": path}
    args.update(overrides)
    async with aiohttp.ClientSession() as session:
        return await get_json(session, sim.rest_base + path, rest_headers(**args))


@pytest.mark.parametrize(("overrides", "code"), [
    ({"key": "someone-else"}, "50111"),
    ({"secret": "wrong-secret"}, "50113"),
    ({"passphrase": "wrong"}, "50105"),
    ({"path_qs": "/api/v5/account/balance?ccy=BTC"}, "50113"),  # the signed path must be the one requested
])
async def test_bad_signatures_get_401_without_data(sim: SimServer, overrides: dict[str, Any], code: str) -> None:
    status, body = await signed_get(sim, BALANCE, **overrides)
    assert status == 401 and body["code"] == code and "data" not in body


async def test_timestamps_outside_30_s_get_50102_and_malformed_ones_50112(sim: SimServer) -> None:
    now = sim.clock.now_ms()
    assert (await signed_get(sim, BALANCE, epoch_ms=now - 31_000))[1]["code"] == "50102"
    assert (await signed_get(sim, BALANCE, epoch_ms=now + 31_000))[1]["code"] == "50102"
    assert (await signed_get(sim, BALANCE, epoch_ms=now - 25_000))[1]["code"] == "0"
    cfg = sim.config
    headers = rest_headers(cfg.api_key, cfg.api_secret, cfg.passphrase, "GET", BALANCE)
    headers["OK-ACCESS-TIMESTAMP"] = iso_ms(now).replace("T", " ").removesuffix("Z")
    async with aiohttp.ClientSession() as session:
        status, body = await get_json(session, sim.rest_base + BALANCE, headers)
        assert (status, body["code"]) == (401, "50112")
        status, body = await get_json(session, sim.rest_base + BALANCE)
        assert (status, body["code"]) == (401, "50103")


async def test_a_signed_query_string_is_verified_exactly_as_sent(sim: SimServer) -> None:
    status, body = await signed_get(sim, "/api/v5/account/balance?ccy=USDT,BTC")
    assert status == 200 and sorted(d["ccy"] for d in body["data"][0]["details"]) == ["BTC", "USDT"]


async def test_demo_and_live_keys_are_told_apart_by_x_simulated_trading(sim: SimServer) -> None:
    assert (await signed_get(sim, BALANCE, demo=True))[1]["code"] == "50101"
    async with SimServer(SimConfig(key_env=KeyEnv.DEMO, **creds())) as demo:
        assert (await signed_get(demo, BALANCE, demo=True))[1]["code"] == "0"
        status, body = await signed_get(demo, BALANCE)
        assert (status, body["code"]) == (401, "50101")


async def test_unknown_paths_get_okx_404_shape_and_unknown_instruments_51001(sim: SimServer) -> None:
    async with aiohttp.ClientSession() as session:
        status, body = await get_json(session, sim.rest_base + "/api/v5/market/nothing")
        assert status == 404 and body["code"] == 404 and body["error_code"] == "404"
        status, body = await get_json(session, sim.rest_base + "/api/v5/market/trades?instId=NOPE-USDT")
        assert (status, body["code"], body["data"]) == (200, "51001", [])
        status, body = await get_json(session, sim.rest_base + "/api/v5/public/instruments")
        assert (status, body["code"]) == (400, "50014")


async def test_rate_limit_violations_answer_50011_as_429_and_200_alternately_and_are_counted() -> None:
    limits = {"/api/v5/public/time": RestLimit(2, 60.0)}
    async with SimServer(SimConfig(rest_limits=limits, **creds())) as sim, aiohttp.ClientSession() as session:
        answers = [await get_json(session, sim.rest_base + "/api/v5/public/time") for _ in range(5)]
        assert [(s, b["code"]) for s, b in answers] == [(200, "0"), (200, "0"), (429, "50011"), (200, "50011"),
                                                       (429, "50011")]
        assert answers[2][1] == {"msg": "Too Many Requests", "code": "50011"}
        assert answers[3][1]["data"] == [] and answers[3][1]["msg"].startswith("Rate limit reached")
        assert sim.stats.rest_requests["/api/v5/public/time"] == 5
        assert sim.stats.rest_violations["/api/v5/public/time"] == 3 == sim.stats.violations
        assert sim.stats.rest_peak["/api/v5/public/time"] == 2


@pytest.mark.parametrize(("mode", "status"), [(RateLimitHttp.HTTP_200, 200), (RateLimitHttp.HTTP_429, 429)])
async def test_the_50011_form_is_configurable(mode: RateLimitHttp, status: int) -> None:
    limits = {"/api/v5/market/books": RestLimit(1, 60.0)}
    async with SimServer(SimConfig(rest_limits=limits, rate_limit_http=mode, **creds())) as sim, \
            aiohttp.ClientSession() as session:
        url = sim.rest_base + "/api/v5/market/books?instId=BTC-USDT"
        await get_json(session, url)
        got, body = await get_json(session, url)
        assert (got, body["code"]) == (status, "50011")


async def test_private_limits_are_per_key_and_instruments_per_ip_and_inst_type() -> None:
    limits = {"/api/v5/account/config": RestLimit(1, 60.0, "key"),
              "/api/v5/public/instruments": RestLimit(1, 60.0, "ip+instType")}
    async with SimServer(SimConfig(rest_limits=limits, **creds())) as sim, aiohttp.ClientSession() as session:
        assert (await signed_get(sim, "/api/v5/account/config"))[1]["code"] == "0"
        assert (await signed_get(sim, "/api/v5/account/config"))[1]["code"] == "50011"
        for inst_type in ("SPOT", "SWAP"):
            _, body = await get_json(session, f"{sim.rest_base}/api/v5/public/instruments?instType={inst_type}")
            assert body["code"] == "0"
        _, body = await get_json(session, f"{sim.rest_base}/api/v5/public/instruments?instType=SPOT")
        assert body["code"] == "50011"
        assert dict(sim.stats.rest_violations) == {"/api/v5/account/config": 1, "/api/v5/public/instruments": 1}


async def test_a_client_within_the_limits_causes_no_violation() -> None:
    async with SimServer(SimConfig(rate_window_scale=0.05, **creds())) as sim, aiohttp.ClientSession() as session:
        for _ in range(10):  # 10 per 2 s is the limit of /public/time
            assert (await get_json(session, sim.rest_base + "/api/v5/public/time"))[1]["code"] == "0"
        assert sim.stats.violations == 0 and sim.stats.rest_peak["/api/v5/public/time"] == 10


async def history(session: aiohttp.ClientSession, sim: SimServer, query: str) -> tuple[str, list[Any]]:
    _, body = await get_json(session, f"{sim.rest_base}/api/v5/market/history-trades?instId=BTC-USDT{query}")
    return body["code"], body["data"]


async def test_history_trades_pages_by_trade_id_and_by_ts_as_okx_documents(sim: SimServer) -> None:
    await sim.tick(200)
    rows = sim.market.trades("BTC-USDT")
    ids = [int(r.trade_id) for r in rows]
    assert len(ids) > 150
    async with aiohttp.ClientSession() as session:
        code, page = await history(session, sim, "&limit=500")
        assert code == "0" and [int(r["tradeId"]) for r in page] == ids[::-1][:100]
        mid = ids[80]
        _, page = await history(session, sim, f"&after={mid}&limit=10")
        assert [int(r["tradeId"]) for r in page] == ids[70:80][::-1]
        _, page = await history(session, sim, f"&before={mid}&limit=10")
        assert [int(r["tradeId"]) for r in page] == ids[-10:][::-1]  # `before` alone: the latest trades
        _, page = await history(session, sim, f"&before={ids[10]}&after={ids[40]}&limit=5")
        assert [int(r["tradeId"]) for r in page] == ids[35:40][::-1]  # the ones nearest `after`
        ts = int(rows[100].ts)
        _, page = await history(session, sim, f"&type=2&after={ts}&limit=100")
        assert page and all(int(r["ts"]) < ts for r in page)
        assert [r["tradeId"] for r in page] == [r.trade_id for r in rows if int(r.ts) < ts][::-1][:100]
        code, page = await history(session, sim, f"&type=2&before={ts}")
        assert (code, page) == ("50039", [])
        _, body = await get_json(session, f"{sim.rest_base}/api/v5/market/trades?instId=BTC-USDT&limit=1000")
        assert len(body["data"]) == min(500, len(ids))


async def test_rest_history_equals_the_pushed_trades_including_the_fast_path(sim: SimServer) -> None:
    async with await Client.connect(sim.ws_url("business")) as c:
        await c.subscribe({"channel": "trades-all", "instId": "ETH-USDT"})
        await sim.tick(20)
        await sim.pump_trades("ETH-USDT", 300)
        await sim.tick(20)
        pushed = [f["data"][0] for f in pushes(await c.sync(), "trades-all")]
    assert [p["tradeId"] for p in pushed] == [r.trade_id for r in sim.market.trades("ETH-USDT")]
    assert pushed == [{"instId": r.inst_id, "tradeId": r.trade_id, "px": r.px, "sz": r.sz, "side": r.side,
                       "source": r.source, "ts": r.ts} for r in sim.market.trades("ETH-USDT")]


async def test_candles_are_computed_from_the_same_trades_and_page_by_ts() -> None:
    start = 1_767_225_600_000  # 2026-01-01T00:00:00Z
    async with SimServer(SimConfig(start_ms=start, tick_ms=1000, **creds())) as sim:
        async with await Client.connect(sim.ws_url("business")) as c:
            await c.subscribe({"channel": "candle1m", "instId": "BTC-USDT"})
            await sim.tick(300)
            pushed = [f["data"][0] for f in pushes(await c.sync(), "candle1m")]
        by_bar: dict[int, list[Any]] = defaultdict(list)
        for r in sim.market.trades("BTC-USDT"):
            by_bar[int(r.ts) // 60_000 * 60_000].append(r)
        async with aiohttp.ClientSession() as session:
            _, body = await get_json(session, f"{sim.rest_base}/api/v5/market/history-candles?instId=BTC-USDT&bar=1m")
            rows = body["data"]
            current = sim.market.now_ms() // 60_000 * 60_000
            assert [int(r[0]) for r in rows] == list(range(current, min(by_bar) - 1, -60_000))
            assert [r[8] for r in rows] == ["0"] + ["1"] * (len(rows) - 1)
            for row, older in zip(rows, [*rows[1:], None], strict=True):
                trades = by_bar.get(int(row[0]))
                if not trades:  # a bar without trades repeats the previous close
                    assert older is not None and row[1:5] == [older[4]] * 4 and row[5] == "0"
                    continue
                assert Decimal(row[1]) == Decimal(trades[0].px) and Decimal(row[4]) == Decimal(trades[-1].px)
                assert Decimal(row[2]) == max(Decimal(t.px) for t in trades)
                assert Decimal(row[5]) == sum(Decimal(t.sz) for t in trades)
            closed = {r[0]: r for r in rows if r[8] == "1"}
            assert closed and all(p == closed[p[0]] for p in pushed if p[8] == "1")
            oldest = rows[-1][0]
            _, body = await get_json(session, f"{sim.rest_base}/api/v5/market/candles?instId=BTC-USDT&bar=1m"
                                              f"&before={oldest}&limit=2")
            assert [r[0] for r in body["data"]] == [r[0] for r in rows[-3:-1]]
            _, body = await get_json(session, f"{sim.rest_base}/api/v5/market/candles?instId=BTC-USDT&bar=7m")
            assert body["code"] == "51000"


async def test_public_time_follows_the_simulator_clock_offset(sim: SimServer) -> None:
    sim.faults.clock_offset(90_000)
    async with aiohttp.ClientSession() as session:
        _, body = await get_json(session, sim.rest_base + "/api/v5/public/time")
    server_ms = int(body["data"][0]["ts"])
    assert abs(server_ms - sim.clock.now_ms()) < 5_000
    # a client signing with its own (now 90 s behind) clock is refused; one corrected from /public/time is not
    status, refused = await signed_get(sim, BALANCE, epoch_ms=server_ms - 90_000)
    assert (status, refused["code"]) == (401, "50102")
    assert (await signed_get(sim, BALANCE, epoch_ms=server_ms))[1]["code"] == "0"


async def test_funding_rate_history_pages_settlements_newest_first_by_funding_time_for_swaps_only() -> None:
    hour = 3_600_000
    start = (1_790_000_000_000 // hour) * hour
    config = SimConfig(instruments=("BTC-USDT-SWAP", "BTC-USDT"), start_ms=start, tick_ms=60_000,
                       funding_interval_ms=hour, auto_tick_s=None, **creds())
    async with SimServer(config) as sim, aiohttp.ClientSession() as session:
        await sim.tick(7 * 60 + 1)  # seven hours (the first step is at start_ms): a settlement every hour
        path = sim.rest_base + "/api/v5/public/funding-rate-history?instId=BTC-USDT-SWAP"
        status, body = await get_json(session, path)
        times = [int(r["fundingTime"]) for r in body["data"]]
        assert status == 200 and body["code"] == "0"
        assert times == [start + h * hour for h in range(7, 0, -1)]  # newest first, one per interval
        row = body["data"][0]
        assert set(row) == {"formulaType", "fundingRate", "fundingTime", "instId", "instType", "method",
                            "realizedRate"} and row["instType"] == "SWAP"
        _, older = await get_json(session, f"{path}&after={times[1]}&limit=2")  # exclusive cursor
        assert [int(r["fundingTime"]) for r in older["data"]] == times[2:4]
        _, newer = await get_json(session, f"{path}&before={times[3]}")
        assert [int(r["fundingTime"]) for r in newer["data"]] == times[:3]
        _, spot = await get_json(session, sim.rest_base + "/api/v5/public/funding-rate-history?instId=BTC-USDT")
        assert spot["code"] == "51000"  # funding is a SWAP thing
