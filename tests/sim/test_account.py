"""The scripted private account: pushes on orders/fills/positions/account/balance_and_position/orders-algo in
OKX's shapes, per-channel connection caps, repeated pushes, snapshots, and the private REST endpoints."""

from __future__ import annotations

import json
import secrets
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from ingest.sim import AccountError, SimConfig, SimServer
from tests.sim.shapes import load_jsonl, shape_diff
from tests.sim.test_rest import signed_get
from tests.sim.wsclient import Client, Frame, pushes


def creds() -> dict[str, Any]:
    return {"api_key": secrets.token_hex(16), "api_secret": secrets.token_hex(32), "passphrase": secrets.token_hex(8)}


async def private_client(sim: SimServer, *args: dict[str, str], endpoint: str = "private") -> tuple[Client,
                                                                                                  list[Frame]]:
    c = await Client.connect(sim.ws_url(endpoint))
    await c.login(sim.config.api_key, sim.config.api_secret, sim.config.passphrase)
    first = await c.subscribe(*args)
    return c, first + await c.sync()


async def test_subscribing_sends_snapshots_for_account_positions_and_balance_but_not_orders(sim: SimServer) -> None:
    c, frames = await private_client(sim, {"channel": "account"}, {"channel": "positions", "instType": "ANY"},
                                     {"channel": "balance_and_position"}, {"channel": "orders", "instType": "ANY"})
    await c.ws.close()
    account = pushes(frames, "account")
    assert [(f["eventType"], f["curPage"], f["lastPage"]) for f in account] == [("snapshot", 1, True)]
    assert sorted(d["ccy"] for d in account[0]["data"][0]["details"]) == ["BTC", "USDT"]
    assert account[0]["arg"] == {"channel": "account", "uid": sim.config.uid}
    positions = pushes(frames, "positions")
    assert [(f["eventType"], f["data"]) for f in positions] == [("snapshot", [])]
    balance = pushes(frames, "balance_and_position")[0]["data"][0]
    assert balance["eventType"] == "snapshot" and {b["ccy"] for b in balance["balData"]} == {"BTC", "USDT"}
    assert pushes(frames, "orders") == []


async def test_an_order_lifecycle_pushes_orders_fills_account_and_the_public_trade(sim: SimServer) -> None:
    c, _ = await private_client(sim, {"channel": "orders", "instType": "SPOT"}, {"channel": "fills"},
                                {"channel": "account", "ccy": "USDT"}, {"channel": "balance_and_position"})
    async with await Client.connect(sim.ws_url("public")) as public, c:
        await public.subscribe({"channel": "trades", "instId": "BTC-USDT"})
        ord_id = await sim.account.place_order("BTC-USDT", "buy", "0.02", "43000", cl_ord_id="123")
        trade_id = await sim.account.fill(ord_id, "0.01")
        await sim.account.fill(ord_id)
        frames = await c.sync()
        public_trades = [f["data"][0] for f in pushes(await public.sync(), "trades")]
    orders = [f["data"][0] for f in pushes(frames, "orders")]
    assert [(o["state"], o["fillSz"], o["accFillSz"]) for o in orders] == [
        ("live", "0", "0"), ("partially_filled", "0.01", "0.01"), ("filled", "0.01", "0.02")]
    assert orders[1]["tradeId"] == trade_id and orders[1]["fillPx"] == "43000" and orders[1]["avgPx"] == "43000"
    assert orders[1]["fee"] == "-0.00001" and orders[1]["feeCcy"] == "BTC"
    fills = [f["data"][0] for f in pushes(frames, "fills")]
    assert (fills[0]["tradeId"], fills[0]["fillSz"], fills[0]["clOrdId"]) == (trade_id, "0.01", "123")
    assert trade_id in [t["tradeId"] for t in public_trades]
    account = pushes(frames, "account")
    assert all(f["eventType"] == "event_update" for f in account)
    usdt = [d for f in account for d in f["data"][0]["details"]]
    assert {d["ccy"] for d in usdt} == {"USDT"}  # the arg's ccy filter
    assert usdt[0]["frozenBal"] == "860" and Decimal(usdt[-1]["cashBal"]) == Decimal("10000") - Decimal("860")
    filled = [f["data"][0] for f in pushes(frames, "balance_and_position")]
    assert filled[0]["eventType"] == "filled" and filled[0]["trades"] == [{"instId": "BTC-USDT", "tradeId": trade_id}]


async def test_cancel_and_order_filters(sim: SimServer) -> None:
    c, _ = await private_client(sim, {"channel": "orders", "instType": "SWAP"},
                                {"channel": "orders", "instType": "ANY", "instId": "BTC-USDT"})
    async with c:
        spot = await sim.account.place_order("BTC-USDT", "sell", "0.01", "50000")
        swap = await sim.account.place_order("BTC-USDT-SWAP", "buy", "1", "40000")
        await sim.account.cancel(swap)
        frames = pushes(await c.sync(), "orders")
    by_arg = [(f["arg"].get("instType"), f["data"][0]["ordId"], f["data"][0]["state"]) for f in frames]
    assert by_arg == [("ANY", spot, "live"), ("SWAP", swap, "live"), ("SWAP", swap, "canceled")]
    assert frames[-1]["data"][0]["cancelSource"] == "1"
    with pytest.raises(AccountError):
        await sim.account.fill(swap)
    with pytest.raises(AccountError):
        await sim.account.place_order("BTC-USDT", "buy", "0.000000001", "40000")
    with pytest.raises(AccountError):
        await sim.account.place_order("BTC-USDT", "buy", "0.01", "40000.05")


async def test_derivative_fills_move_the_position(sim: SimServer) -> None:
    c, _ = await private_client(sim, {"channel": "positions", "instType": "SWAP"})
    async with c:
        buy = await sim.account.place_order("BTC-USDT-SWAP", "buy", "3", "43000")
        await sim.account.fill(buy)
        sell = await sim.account.place_order("BTC-USDT-SWAP", "sell", "1", "43100")
        await sim.account.fill(sell)
        frames = pushes(await c.sync(), "positions")
    updates = [f for f in frames if f["eventType"] == "event_update"]
    assert [(u["data"][0]["pos"], u["data"][0]["avgPx"]) for u in updates] == [("3", "43000"), ("2", "43000")]
    # closing 1 contract of 0.01 BTC 100 higher realizes 1 USDT
    assert Decimal(updates[-1]["data"][0]["pnl"]) == Decimal("1")
    status, body = await signed_get(sim, "/api/v5/account/positions?instType=SWAP")
    assert status == 200 and body["data"][0]["pos"] == "2"
    assert body["data"][0]["posId"] == updates[0]["data"][0]["posId"]


async def test_order_pushes_can_be_repeated_like_okx_does(sim: SimServer) -> None:
    c, _ = await private_client(sim, {"channel": "orders", "instType": "ANY"})
    async with c:
        ord_id = await sim.account.place_order("ETH-USDT", "buy", "0.1", "2000")
        await sim.account.repeat_order_push(ord_id, times=2)
        frames = [f["data"][0] for f in pushes(await c.sync(), "orders")]
    assert [f["ordId"] for f in frames] == [ord_id] * 3
    assert len({f["uTime"] for f in frames}) == 3
    async with SimServer(SimConfig(repeat_order_pushes=1, **creds())) as again:
        c, _ = await private_client(again, {"channel": "orders", "instType": "ANY"})
        async with c:
            await again.account.place_order("ETH-USDT", "buy", "0.1", "2000")
            assert len(pushes(await c.sync(), "orders")) == 2


async def test_algo_orders_are_pushed_on_business_after_login(sim: SimServer) -> None:
    c, _ = await private_client(sim, {"channel": "orders-algo", "instType": "ANY"}, endpoint="business")
    async with c:
        algo = await sim.account.place_algo("BTC-USDT-SWAP", "sell", "1", "42000.5")
        ord_id = await sim.account.trigger_algo(algo)
        other = await sim.account.place_algo("BTC-USDT-SWAP", "buy", "1", "44000")
        await sim.account.cancel_algo(other)
        frames = [f["data"][0] for f in pushes(await c.sync(), "orders-algo")]
    assert [(f["algoId"], f["state"]) for f in frames] == [(algo, "live"), (algo, "effective"), (other, "live"),
                                                           (other, "canceled")]
    assert frames[1]["ordIdList"] == [ord_id] and frames[1]["triggerPx"] == "42000.5"


async def test_balances_move_with_account_and_transfer_pushes(sim: SimServer) -> None:
    c, _ = await private_client(sim, {"channel": "account"}, {"channel": "balance_and_position"})
    async with c:
        await sim.account.transfer("USDT", "-2500")
        await sim.account.set_balance("ETH", "3")
        frames = await c.sync()
    bal = [f["data"][0] for f in pushes(frames, "balance_and_position")]
    assert [(b["eventType"], b["balData"][0]["ccy"], b["balData"][0]["cashBal"]) for b in bal] == [
        ("transferred", "USDT", "7500"), ("transferred", "ETH", "3")]
    status, body = await signed_get(sim, "/api/v5/account/balance")
    assert status == 200
    assert {d["ccy"]: d["cashBal"] for d in body["data"][0]["details"]} == {"BTC": "0.5", "ETH": "3", "USDT": "7500"}


async def test_channel_conn_count_and_its_cap(shared_okx: Path) -> None:
    doc = load_jsonl(shared_okx / "frames/okx_docs_examples/okxdoc_2025_conn-count.jsonl")
    async with SimServer(SimConfig(conn_cap_per_channel=2, connect_window_s=0.01, **creds())) as sim:
        clients = []
        counts = []
        for _ in range(3):
            c = await Client.connect(sim.ws_url("private"))
            await c.login(sim.config.api_key, sim.config.api_secret, sim.config.passphrase)
            await c.request("subscribe", [{"channel": "orders", "instType": "ANY"}])
            ack = await c.recv()
            event = await c.recv()
            assert ack["event"] == "subscribe"
            counts.append(event)
            clients.append(c)
        assert [(e["event"], e["connCount"]) for e in counts] == [
            ("channel-conn-count", "1"), ("channel-conn-count", "2"), ("channel-conn-count-error", "2")]
        assert shape_diff(counts[0], doc[0]) == [] and shape_diff(counts[2], doc[1]) == []
        await sim.account.place_order("BTC-USDT", "buy", "0.01", "40000")
        got = [len(pushes(await c.sync(), "orders")) for c in clients]
        assert got == [1, 1, 0]  # the capped connection's subscription was terminated
        for c in clients:
            await c.ws.close()


async def test_snapshots_are_paginated_and_periodic_unless_update_interval_is_0() -> None:
    config = SimConfig(private_page_size=1, private_snapshot_every_ticks=5, **creds())
    async with SimServer(config) as sim:
        for inst in ("BTC-USDT-SWAP", "BTC-USDT-SWAP"):
            await sim.account.fill(await sim.account.place_order(inst, "buy", "1", "43000"))
        await sim.account.fill(await sim.account.place_order("BTC-USDT-SWAP", "sell", "0.5", "43000"))
        sim.market.add_instrument("ETH-USDT-SWAP", state="live")
        await sim.account.fill(await sim.account.place_order("ETH-USDT-SWAP", "buy", "1", "2300"))
        quiet = json.dumps({"updateInterval": "0"})
        c, first = await private_client(sim, {"channel": "positions", "instType": "ANY"},
                                        {"channel": "account", "extraParams": quiet})
        async with c:
            snap = pushes(first, "positions")
            assert [(f["curPage"], f["lastPage"], len(f["data"])) for f in snap] == [(1, False, 1), (2, True, 1)]
            await sim.tick(5)
            later = await c.sync()
        assert [f["eventType"] for f in pushes(later, "positions")] == ["snapshot", "snapshot"]
        assert pushes(later, "account") == []


async def test_private_rest_history_matches_the_pushes(sim: SimServer) -> None:
    orders = []
    for px in ("43000", "43001.5", "42999.9"):
        ord_id = await sim.account.place_order("BTC-USDT", "buy", "0.01", px)
        await sim.account.fill(ord_id)
        orders.append(ord_id)
    canceled = await sim.account.place_order("BTC-USDT", "sell", "0.01", "50000")
    await sim.account.cancel(canceled)
    status, body = await signed_get(sim, "/api/v5/trade/fills")
    assert status == 200 and [f["ordId"] for f in body["data"]] == orders[::-1]
    bills = [f["billId"] for f in body["data"]]
    status, page = await signed_get(sim, f"/api/v5/trade/fills?after={bills[0]}&limit=1")
    assert [f["billId"] for f in page["data"]] == [bills[1]]
    status, page = await signed_get(sim, f"/api/v5/trade/fills?before={bills[2]}")
    assert [f["billId"] for f in page["data"]] == bills[:2]
    assert (await signed_get(sim, "/api/v5/trade/fills-history"))[1]["code"] == "50014"
    status, history = await signed_get(sim, "/api/v5/trade/fills-history?instType=SPOT")
    assert [f["tradeId"] for f in history["data"]] == [f["tradeId"] for f in body["data"]]
    status, done = await signed_get(sim, "/api/v5/trade/orders-history?instType=SPOT")
    assert [(o["ordId"], o["state"]) for o in done["data"]] == [(canceled, "canceled")] + [
        (o, "filled") for o in orders[::-1]]
    status, done = await signed_get(sim, "/api/v5/trade/orders-history?instType=SPOT&state=filled&limit=2")
    assert [o["ordId"] for o in done["data"]] == orders[:0:-1]


@pytest.mark.parametrize("perm", ["read_only", "read_only,trade", "read_only,withdraw,trade"])
async def test_account_config_reports_the_configured_permissions(perm: str) -> None:
    async with SimServer(SimConfig(perm=perm, **creds())) as sim:
        status, body = await signed_get(sim, "/api/v5/account/config")
        assert status == 200 and body["data"][0]["perm"] == perm and body["data"][0]["uid"] == sim.config.uid
