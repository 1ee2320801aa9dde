"""The deterministic market: same seed -> same history, realistic decimal strings at each instrument's precision,
the public channels beyond books and trades, and the benchmark's fast path."""

from __future__ import annotations

import re
import secrets
from decimal import Decimal
from typing import Any

import aiohttp

from ingest.sim import ManualWall, SimConfig, SimServer
from ingest.sim.instruments import spec_for
from tests.sim.wsclient import Client, Frame, get_json, pushes

START_MS = 1_767_225_600_000
DECIMAL = re.compile(r"^-?\d+(\.\d*[1-9])?$")  # no exponent, no trailing zeros, no float repr


def creds() -> dict[str, Any]:
    return {"api_key": secrets.token_hex(16), "api_secret": secrets.token_hex(32), "passphrase": secrets.token_hex(8)}


async def run_market(seed: int, ticks: int) -> tuple[list[Frame], list[Any]]:
    async with SimServer(SimConfig(seed=seed, start_ms=START_MS, **creds())) as sim, \
            await Client.connect(sim.ws_url("public")) as c:
        first = await c.subscribe({"channel": "books", "instId": "BTC-USDT-SWAP"},
                                  {"channel": "trades", "instId": "ETH-USDT"})
        await sim.tick(ticks)
        frames = first + await c.sync()
        return [f for f in frames if "data" in f], sim.market.trades("ETH-USDT")


async def test_the_same_seed_gives_the_same_history_and_another_seed_another() -> None:
    frames_a, trades_a = await run_market(7, 60)
    frames_b, trades_b = await run_market(7, 60)
    frames_c, trades_c = await run_market(8, 60)
    assert frames_a == frames_b and trades_a == trades_b and len(trades_a) > 10
    assert trades_a != trades_c and frames_a != frames_c
    assert [int(t.ts) for t in trades_a] == sorted(int(t.ts) for t in trades_a)
    assert all(START_MS <= int(t.ts) <= START_MS + 60 * 100 for t in trades_a)


async def test_prices_and_sizes_are_exact_decimals_at_instrument_precision(sim: SimServer) -> None:
    await sim.tick(150)
    for inst_id in sim.config.instruments:
        spec = spec_for(inst_id)
        tick, lot, start = Decimal(spec.tick_sz), Decimal(spec.lot_sz), Decimal(spec.start_px)
        trades = sim.market.trades(inst_id)
        assert len(trades) > 50
        for t in trades:
            assert DECIMAL.match(t.px) and DECIMAL.match(t.sz), t
            px, sz = Decimal(t.px), Decimal(t.sz)
            assert px % tick == 0 and sz % lot == 0 and sz >= Decimal(spec.min_sz)
            assert abs(px - start) / start < Decimal("0.05")
    assert spec_for("BTC-USDT").tick_sz == "0.1" and spec_for("BTC-USDT").lot_sz == "0.00000001"
    assert spec_for("BTC-USDT-SWAP").ct_val == "0.01" and spec_for("BTC-USD-SWAP").ct_type == "inverse"


async def test_public_price_channels_push_current_values_then_changes(sim: SimServer) -> None:
    async with await Client.connect(sim.ws_url("public")) as c:
        first = await c.subscribe({"channel": "mark-price", "instId": "BTC-USDT-SWAP"},
                                  {"channel": "index-tickers", "instId": "BTC-USDT"},
                                  {"channel": "funding-rate", "instId": "BTC-USDT-SWAP"},
                                  {"channel": "open-interest", "instId": "BTC-USDT-SWAP"},
                                  {"channel": "price-limit", "instId": "BTC-USDT-SWAP"},
                                  {"channel": "tickers", "instId": "BTC-USDT-SWAP"},
                                  {"channel": "liquidation-orders", "instType": "SWAP"},
                                  {"channel": "instruments", "instType": "SWAP"})
        frames = first + await c.sync()
        for channel in ("mark-price", "index-tickers", "funding-rate", "open-interest", "price-limit", "tickers"):
            assert len(pushes(frames, channel)) == 1, channel
        sim.market.force_liquidation("BTC-USDT-SWAP")
        sim.market.add_instrument("SOL-USDT-SWAP")
        await sim.tick(300)
        frames = await c.sync()
    ticker = pushes(frames, "tickers")[-1]["data"][0]
    mark = Decimal(pushes(frames, "mark-price")[-1]["data"][0]["markPx"])
    assert Decimal(ticker["bidPx"]) <= mark <= Decimal(ticker["askPx"])
    assert len(pushes(frames, "funding-rate")) == 1
    assert abs(Decimal(pushes(frames, "funding-rate")[0]["data"][0]["fundingRate"])) <= Decimal("0.00375")
    liquidation = pushes(frames, "liquidation-orders")[0]["data"][0]
    assert liquidation["instId"] == "BTC-USDT-SWAP" and liquidation["details"][0]["side"] in ("buy", "sell")
    listed = pushes(frames, "instruments")[0]["data"][0]
    assert (listed["instId"], listed["state"], listed["ctVal"]) == ("SOL-USDT-SWAP", "preopen", "1")


async def test_a_frozen_market_makes_no_trades(sim: SimServer) -> None:
    sim.market.freeze("BTC-USDT")
    await sim.tick(100)
    assert sim.market.trades("BTC-USDT") == [] and len(sim.market.trades("ETH-USDT")) > 0
    sim.market.freeze("BTC-USDT", frozen=False)
    await sim.tick(100)
    assert sim.market.trades("BTC-USDT")


async def test_the_fast_path_pumps_prepared_trades_that_rest_also_serves(sim: SimServer) -> None:
    async with await Client.connect(sim.ws_url("public")) as c1, await Client.connect(sim.ws_url("public")) as c2:
        await c1.subscribe({"channel": "trades", "instId": "BTC-USDT"})
        await c2.subscribe({"channel": "trades", "instId": "BTC-USDT"})
        prepared = sim.prepare_trades("BTC-USDT", 2000)
        assert len(prepared) == 2000
        assert await sim.pump(prepared) == 4000
        got1 = [f["data"][0]["tradeId"] for f in pushes(await c1.sync(), "trades")]
        got2 = [f["data"][0]["tradeId"] for f in pushes(await c2.sync(), "trades")]
    assert got1 == got2 == [t.trade_id for t in sim.market.trades("BTC-USDT")]
    async with aiohttp.ClientSession() as session:
        _, body = await get_json(session, f"{sim.rest_base}/api/v5/market/trades?instId=BTC-USDT&limit=3")
    assert [r["tradeId"] for r in body["data"]] == got1[-1:-4:-1]


async def test_the_clock_is_injectable_and_offsettable() -> None:
    wall = ManualWall(START_MS)
    async with SimServer(SimConfig(wall_ms=wall, **creds())) as sim, aiohttp.ClientSession() as session:
        await sim.tick(3)
        assert [int(t.ts) for t in sim.market.trades("BTC-USDT")][-1] <= START_MS + 3
        wall.advance(60_000)
        sim.faults.clock_offset(5_000)
        _, body = await get_json(session, sim.rest_base + "/api/v5/public/time")
        assert body["data"][0]["ts"] == str(START_MS + 65_000)
        await sim.tick(1)
        assert sim.market.get("BTC-USDT").ts == START_MS + 65_000 == sim.market.now_ms()
