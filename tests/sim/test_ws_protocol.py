"""OKX's WebSocket rules as the simulator enforces them: ping/pong, idle close, frame size, request budget,
connect rate, the channel-to-endpoint split, request errors and login verification."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
import websockets

from ingest.sim import SimConfig, SimServer
from tests.sim.wsclient import Client, hmac_b64, login_args


def creds() -> dict[str, Any]:
    return {"api_key": secrets.token_hex(16), "api_secret": secrets.token_hex(32), "passphrase": secrets.token_hex(8)}


async def test_text_ping_gets_text_pong(sim: SimServer) -> None:
    async with await Client.connect(sim.ws_url("public")) as c:
        await c.send("ping")
        assert await c.recv_text() == "pong"
    assert sim.stats.connections[sim.connections(include_closed=True)[0].conn_id].pings == 1


async def test_idle_connection_is_closed_with_4004(shared_okx: Path) -> None:
    captured = (shared_okx / "frames/ws_close_frames.txt").read_text()
    async with SimServer(SimConfig(idle_timeout_s=0.2, **creds())) as sim:
        async with await Client.connect(sim.ws_url("private")) as c:
            conn_id = (await sim.wait_connections())[0]
            assert await c.wait_closed() == 4004
            assert c.ws.close_reason == "No data received in 30s."
            assert "No data received in 30s." in captured
        assert await sim.wait_closed(conn_id) == 4004


async def test_client_pings_count_as_traffic_so_a_pinging_connection_outlives_an_idle_one() -> None:
    async with SimServer(SimConfig(idle_timeout_s=0.3, **creds())) as sim, \
            await Client.connect(sim.ws_url("public")) as pinging:
        stop = asyncio.Event()

        async def keep_pinging() -> None:
            while not stop.is_set():
                await pinging.send("ping")
                assert await pinging.recv_text() == "pong"

        task = asyncio.create_task(keep_pinging())
        async with await Client.connect(sim.ws_url("public")) as idle:
            # opened later, so if pings did not count the pinging connection would be closed first
            assert await idle.wait_closed() == 4004
        stop.set()
        await task
        assert [c.open for c in sim.connections()] == [True]


async def test_a_request_frame_over_64_kb_closes_with_1009(sim: SimServer) -> None:
    async with await Client.connect(sim.ws_url("public")) as c:
        big = {"op": "subscribe", "args": [{"channel": "tickers", "instId": "X" * (64 * 1024)}]}
        await c.send(big)
        assert await c.wait_closed() == 1009


async def test_the_request_budget_answers_60014_then_closes() -> None:
    async with SimServer(SimConfig(request_budget=3, **creds())) as sim:
        async with await Client.connect(sim.ws_url("public")) as c:
            for _ in range(3):
                await c.subscribe({"channel": "trades", "instId": "BTC-USDT"})
            await c.request("unsubscribe", [{"channel": "trades", "instId": "BTC-USDT"}])
            error = await c.recv()
            assert (error["event"], error["code"], error["msg"]) == ("error", "60014", "Requests too frequent")
            assert await c.wait_closed() == 4002
        conn = next(iter(sim.stats.connections.values()))
        assert (conn.requests, conn.budget_violations, sim.stats.violations) == (4, 1, 1)


async def test_pings_do_not_count_against_the_request_budget() -> None:
    async with SimServer(SimConfig(request_budget=1, **creds())) as sim:
        async with await Client.connect(sim.ws_url("public")) as c:
            for _ in range(5):
                await c.send("ping")
                assert await c.recv_text() == "pong"
            assert (await c.subscribe({"channel": "trades", "instId": "BTC-USDT"}))[0]["event"] == "subscribe"
        assert sim.stats.violations == 0


async def test_more_than_three_connects_per_second_are_refused_with_http_429() -> None:
    async with SimServer(SimConfig(connect_window_s=60.0, **creds())) as sim:
        clients = [await Client.connect(sim.ws_url("public")) for _ in range(3)]
        with pytest.raises(websockets.InvalidStatus) as refused:
            await Client.connect(sim.ws_url("public"))
        assert refused.value.response.status_code == 429
        for c in clients:
            await c.ws.close()
        assert (sim.stats.ws_connects, sim.stats.ws_connects_rejected, sim.stats.violations) == (3, 1, 1)


@pytest.mark.parametrize(("endpoint", "arg", "code"), [
    ("public", {"channel": "candle1m", "instId": "BTC-USDT"}, "64001"),
    ("public", {"channel": "trades-all", "instId": "BTC-USDT"}, "64001"),
    ("public", {"channel": "orders-algo", "instType": "ANY"}, "64001"),
    ("business", {"channel": "tickers", "instId": "BTC-USDT"}, "64002"),
    ("business", {"channel": "orders", "instType": "ANY"}, "64002"),
    ("public", {"channel": "orders", "instType": "ANY"}, "60018"),
    ("private", {"channel": "tickers", "instId": "BTC-USDT"}, "60018"),
    ("public", {"channel": "no-such-channel", "instId": "BTC-USDT"}, "60018"),
    ("public", {"channel": "tickers", "instId": "NOPE-USDT"}, "60018"),
    ("public", {"channel": "funding-rate", "instId": "BTC-USDT"}, "60018"),
    ("public", {"channel": "liquidation-orders", "instType": "SPOT"}, "60018"),
    ("public", {"channel": "tickers"}, "60013"),
])
async def test_wrong_endpoint_or_channel_gets_okx_error_code(sim: SimServer, endpoint: str, arg: dict[str, str],
                                                             code: str) -> None:
    async with await Client.connect(sim.ws_url(endpoint)) as c:
        await c.request("subscribe", [arg], req_id="7")
        error = await c.recv()
        assert (error["event"], error["code"], error["id"]) == ("error", code, "7")
        assert error["connId"] and isinstance(error["msg"], str)


async def test_error_messages_match_the_captured_texts(sim: SimServer, shared_okx: Path) -> None:
    captured = [json.loads(line) for line in
                (shared_okx / "frames/issues_ws_errors_converted_from_repr.jsonl").read_text().splitlines()]
    async with await Client.connect(sim.ws_url("public")) as c:
        await c.request("subscribe", [{"channel": "candle1m", "instId": "BTC-USDT"}])
        assert (await c.recv())["msg"] == captured[2]["msg"]
        await c.request("subscribe", [{"channel": "candle1s", "instId": "BTC-USDT-SWAP"}])
        assert (await c.recv())["msg"] != captured[3]["msg"]  # candle1s on /public is the 64001 case
    async with await Client.connect(sim.ws_url("private")) as c:
        await c.request("subscribe", [{"channel": "candle1s", "instId": "BTC-USDT-SWAP"}])
        error = await c.recv()
        assert (error["code"], error["msg"]) == (captured[3]["code"], captured[3]["msg"])


async def test_malformed_requests_get_60012_and_unknown_ops_60019(sim: SimServer) -> None:
    async with await Client.connect(sim.ws_url("public")) as c:
        await c.send("{not json")
        error = await c.recv()
        assert (error["code"], error["msg"]) == ("60012", "Invalid request: {not json")
        await c.send({"op": "subscribe", "argss": [{"channel": "tickers", "instId": "BTC-USDT"}]})
        assert (await c.recv())["code"] == "60012"
        await c.send({"id": "9", "op": "order", "args": [{}]})
        error = await c.recv()
        assert (error["code"], error["msg"], error["id"]) == ("60019", "Invalid op: order", "9")
        await c.send({"id": "not-alnum!", "op": "subscribe", "args": [{"channel": "tickers", "instId": "BTC-USDT"}]})
        assert (await c.recv())["code"] == "60012"


async def test_unsubscribe_is_acked_and_stops_the_pushes(sim: SimServer) -> None:
    async with await Client.connect(sim.ws_url("public")) as c:
        await c.subscribe({"channel": "tickers", "instId": "BTC-USDT"})
        await c.request("unsubscribe", [{"channel": "tickers", "instId": "BTC-USDT"}], req_id="u1")
        ack, _ = await c.recv_until(lambda f: f.get("event") == "unsubscribe")
        assert ack["arg"] == {"channel": "tickers", "instId": "BTC-USDT"} and ack["id"] == "u1"
        await sim.wait_unsubscribed({"channel": "tickers"})
        await sim.tick(10)
        assert await c.sync() == []


async def test_login_succeeds_with_okx_ack_and_echoes_the_id(sim: SimServer) -> None:
    cfg = sim.config
    async with await Client.connect(sim.ws_url("private")) as c:
        await c.request("login", [login_args(cfg.api_key, cfg.api_secret, cfg.passphrase)], req_id="L1")
        ack = await c.recv()
        assert ack == {"id": "L1", "event": "login", "code": "0", "msg": "", "connId": ack["connId"]}
        assert await sim.wait_logged_in(endpoint="private") == [ack["connId"]]


def _bad_login(cfg: SimConfig, case: str) -> dict[str, str]:
    now = str(int(time.time()))
    good = login_args(cfg.api_key, cfg.api_secret, cfg.passphrase, now)
    if case == "60004":
        return {**good, "timestamp": "yesterday", "sign": hmac_b64(cfg.api_secret, "yesterdayGET/users/self/verify")}
    if case == "60005":
        return {**good, "apiKey": "unknown-key"}
    if case == "60006":
        return login_args(cfg.api_key, cfg.api_secret, cfg.passphrase, str(int(time.time()) - 31))
    if case == "60007":
        return {**good, "sign": hmac_b64("wrong-secret", f"{now}GET/users/self/verify")}
    if case == "60024":
        return {**good, "passphrase": "wrong"}
    return {"apiKey": cfg.api_key}


@pytest.mark.parametrize(("case", "msg"), [
    ("60004", "Invalid timestamp"), ("60005", "Invalid apiKey"), ("60006", "Timestamp request expired"),
    ("60007", "Invalid sign"), ("60024", "Wrong passphrase"), ("60009", "Login failed."),
])
async def test_login_errors_are_verified_like_okx(sim: SimServer, case: str, msg: str) -> None:
    async with await Client.connect(sim.ws_url("private")) as c:
        await c.request("login", [_bad_login(sim.config, case)])
        error = await c.recv()
        assert error == {"event": "error", "code": case, "msg": msg, "connId": error["connId"]}
        assert (await c.subscribe({"channel": "account"}))[0]["code"] == "60011"


async def test_a_failed_login_can_close_with_4001_when_configured() -> None:
    async with SimServer(SimConfig(close_on_login_failure=True, **creds())) as sim, \
            await Client.connect(sim.ws_url("private")) as c:
        await c.request("login", [_bad_login(sim.config, "60007")])
        assert (await c.recv())["code"] == "60007"
        assert await c.wait_closed() == 4001


async def test_private_channels_before_login_get_60011(sim: SimServer, shared_okx: Path) -> None:
    captured = json.loads((shared_okx / "frames/errors.jsonl").read_text().splitlines()[1])
    async with await Client.connect(sim.ws_url("private")) as c:
        error = (await c.subscribe({"channel": "orders", "instType": "ANY"}))[0]
        assert (error["event"], error["code"], error["msg"]) == (captured["event"], captured["code"], captured["msg"])
    async with await Client.connect(sim.ws_url("business")) as c:
        assert (await c.subscribe({"channel": "orders-algo", "instType": "ANY"}))[0]["code"] == "60011"


async def test_a_batch_subscribe_is_answered_per_arg_in_order(sim: SimServer) -> None:
    async with await Client.connect(sim.ws_url("public")) as c:
        replies = await c.subscribe({"channel": "trades", "instId": "BTC-USDT"},
                                    {"channel": "nope", "instId": "BTC-USDT"},
                                    {"channel": "trades", "instId": "ETH-USDT"})
        assert [(r["event"], r.get("arg", {}).get("instId")) for r in replies] == \
            [("subscribe", "BTC-USDT"), ("error", None), ("subscribe", "ETH-USDT")]
        assert len(await sim.wait_subscribed(lambda s: s.channel == "trades" and s.inst_id == "ETH-USDT")) == 1


async def test_channels_okx_has_but_the_simulator_does_not_push_are_acked(sim: SimServer) -> None:
    async with await Client.connect(sim.ws_url("public")) as c:
        replies = await c.subscribe({"channel": "opt-summary", "instFamily": "BTC-USD"},
                                    {"channel": "status"})
        assert [r["event"] for r in replies] == ["subscribe", "subscribe"]
    async with await Client.connect(sim.ws_url("business")) as c:
        replies = await c.subscribe({"channel": "mark-price-candle1m", "instId": "BTC-USDT-SWAP"},
                                    {"channel": "index-candle1m", "instId": "BTC-USD"})
        assert [r["event"] for r in replies] == ["subscribe", "subscribe"]
