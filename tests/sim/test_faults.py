"""Every fault the simulator can inject, observed through real sockets, and faults combined."""

from __future__ import annotations

import asyncio
import json
import secrets
from itertools import pairwise
from typing import Any

import aiohttp
import pytest
import websockets

from ingest.sim import SimConfig, SimServer
from tests.sim.shapes import shape_diff
from tests.sim.wsclient import Client, get_json, login_args, pushes, rest_headers


def creds() -> dict[str, Any]:
    return {"api_key": secrets.token_hex(16), "api_secret": secrets.token_hex(32), "passphrase": secrets.token_hex(8)}


@pytest.mark.parametrize(("kind", "code"), [("clean", 1000), ("abort", 1006), ("idle", 4004)])
async def test_drop_closes_connections_the_chosen_way(sim: SimServer, kind: str, code: int) -> None:
    async with await Client.connect(sim.ws_url("public")) as c:
        conn_id = (await sim.wait_connections())[0]
        assert sim.faults.drop(kind=kind) == [conn_id]
        assert await c.wait_closed() == code
        assert await sim.wait_closed(conn_id) == code


async def test_drop_can_target_one_endpoint(sim: SimServer) -> None:
    async with await Client.connect(sim.ws_url("public")) as pub, await Client.connect(sim.ws_url("business")) as bus:
        await sim.wait_connections(2)
        sim.faults.drop(kind="abort", endpoint="business")
        assert await bus.wait_closed() == 1006
        await pub.send("ping")
        assert await pub.recv_text() == "pong"


async def test_a_stalled_connection_gets_nothing_and_is_not_idle_closed() -> None:
    async with SimServer(SimConfig(idle_timeout_s=0.3, **creds())) as sim:
        async with await Client.connect(sim.ws_url("public")) as c:
            await c.subscribe({"channel": "trades", "instId": "BTC-USDT"})
            conn_id = (await sim.wait_subscribed({"channel": "trades"}))[0]
            assert sim.faults.stall(conn_id=conn_id) == [conn_id]
            await sim.tick(30)
            assert sim.stats.connections[conn_id].frames_dropped > 0
            async with await Client.connect(sim.ws_url("public")) as later:
                assert await later.wait_closed() == 4004  # the later, idle connection is closed ...
            assert sim.connection(conn_id).open and sim.connection(conn_id).stalled  # ... the stalled one not
            stalled_trades = {r.trade_id for r in sim.market.trades("BTC-USDT")}
            sim.faults.unstall(conn_id=conn_id)
            await sim.tick(30)
            got = [f["data"][0]["tradeId"] for f in pushes(await c.sync(), "trades")]
        assert got and not set(got) & stalled_trades  # what was pushed during the stall is lost: a gap


async def test_notice_64008_is_followed_by_a_close(sim: SimServer) -> None:
    async with await Client.connect(sim.ws_url("private")) as c:
        await sim.wait_connections()
        sim.faults.notice(close_after_s=0.05)
        notice = await c.recv()
        assert notice == {"event": "notice", "code": "64008",
                          "msg": "The connection will soon be closed for a service upgrade. Please reconnect.",
                          "connId": notice["connId"]}
        assert await c.wait_closed() == sim.config.notice_close_code


@pytest.mark.parametrize("how", ["malformed", "truncated", "wrong_type"])
async def test_corrupted_pushes(sim: SimServer, how: str) -> None:
    async with await Client.connect(sim.ws_url("public")) as c:
        await c.subscribe({"channel": "tickers", "instId": "BTC-USDT"})
        first = await c.sync()  # the ticker pushed on subscribe
        sim.faults.corrupt(how, channel="tickers", count=1)
        await sim.tick(3)
        texts = await c.sync_text()
    bad, good = texts[0], texts[1]
    assert json.loads(good)["arg"]["channel"] == "tickers"
    if how == "wrong_type":
        ticker = json.loads(bad)["data"][0]
        assert isinstance(ticker["last"], float | int)
        problems = shape_diff(json.loads(bad), first[-1])  # the fidelity check catches it
        assert len(problems) == 1 and problems[0].startswith("$.data[0].last:")
    else:
        with pytest.raises(json.JSONDecodeError):
            json.loads(bad)


async def test_wrong_type_on_a_book_turns_a_price_into_a_number(sim: SimServer) -> None:
    async with await Client.connect(sim.ws_url("public")) as c:
        await c.subscribe({"channel": "books", "instId": "BTC-USDT"})
        assert (await c.sync())[0]["action"] == "snapshot"
        sim.faults.corrupt("wrong_type", channel="books")
        await sim.tick(1)
        update = (await c.sync())[0]
    levels = update["data"][0]["asks"] or update["data"][0]["bids"]
    assert isinstance(levels[0][0], float | int) and isinstance(levels[0][1], str)


async def test_unknown_channel_and_raw_frames_can_be_pushed(sim: SimServer) -> None:
    async with await Client.connect(sim.ws_url("public")) as c:
        await sim.wait_connections()
        sim.faults.push_unknown_channel()
        sim.faults.send_raw('{"event":"surprise"')
        frames = await c.sync_text()
    assert json.loads(frames[0])["arg"]["channel"] == "sim-unknown-channel"
    assert frames[1] == '{"event":"surprise"'


async def test_logins_can_be_rejected_for_a_count_or_until_cleared(sim: SimServer) -> None:
    cfg = sim.config
    async with await Client.connect(sim.ws_url("private")) as c:
        sim.faults.reject_logins("60006", count=1)
        assert (await c.login(cfg.api_key, cfg.api_secret, cfg.passphrase))["code"] == "60006"
        assert (await c.login(cfg.api_key, cfg.api_secret, cfg.passphrase))["code"] == "0"
        sim.faults.reject_logins("60009", count=None, seconds=600)
        for _ in range(3):
            assert (await c.login(cfg.api_key, cfg.api_secret, cfg.passphrase))["code"] == "60009"
        sim.faults.clear()
        assert (await c.login(cfg.api_key, cfg.api_secret, cfg.passphrase))["code"] == "0"


async def test_revoking_the_key_closes_logged_in_connections_with_4007(sim: SimServer) -> None:
    cfg = sim.config
    async with await Client.connect(sim.ws_url("private")) as logged, \
            await Client.connect(sim.ws_url("public")) as anonymous:
        await logged.login(cfg.api_key, cfg.api_secret, cfg.passphrase)
        assert len(sim.faults.revoke_login()) == 1
        assert await logged.wait_closed() == 4007
        await anonymous.send("ping")
        assert await anonymous.recv_text() == "pong"


async def test_a_skewed_clock_expires_logins_of_a_client_that_does_not_correct(sim: SimServer) -> None:
    cfg = sim.config
    sim.faults.clock_offset(-60_000)
    async with await Client.connect(sim.ws_url("private")) as c, aiohttp.ClientSession() as session:
        assert (await c.login(cfg.api_key, cfg.api_secret, cfg.passphrase))["code"] == "60006"
        _, body = await get_json(session, sim.rest_base + "/api/v5/public/time")
        server_s = int(body["data"][0]["ts"]) // 1000
        await c.request("login", [login_args(cfg.api_key, cfg.api_secret, cfg.passphrase, str(server_s))])
        assert (await c.recv())["code"] == "0"


async def test_connects_can_be_refused(sim: SimServer) -> None:
    sim.faults.reject_connects(1, status=503)
    with pytest.raises(websockets.InvalidStatus) as refused:
        await Client.connect(sim.ws_url("public"))
    assert refused.value.response.status_code == 503
    async with await Client.connect(sim.ws_url("public")) as c:
        await c.send("ping")
        assert await c.recv_text() == "pong"
    assert sim.stats.ws_connects_refused_by_fault == 1 and sim.stats.violations == 0


async def test_rest_5xx_raw_bodies_and_rate_limit_storms(sim: SimServer) -> None:
    time_url = sim.rest_base + "/api/v5/public/time"
    async with aiohttp.ClientSession() as session:
        sim.faults.rest_error(count=2, path="/api/v5/public/time")
        for _ in range(2):
            status, body = await get_json(session, time_url)
            assert (status, body["code"]) == (503, "50001")
        assert (await get_json(session, time_url))[0] == 200
        sim.faults.rest_error(count=1, status=502, body="<html>502 Bad Gateway</html>")
        async with session.get(time_url) as resp:
            assert resp.status == 502 and await resp.text() == "<html>502 Bad Gateway</html>"
        sim.faults.rest_rate_limit(3)
        answers = [await get_json(session, time_url) for _ in range(4)]
        assert [b["code"] for _, b in answers] == ["50011", "50011", "50011", "0"]
        assert {s for s, _ in answers[:3]} == {200, 429}
    assert sim.stats.rest_injected["/api/v5/public/time"] == 6 and sim.stats.violations == 0


async def test_slow_rest_answers_are_held_back_then_answered(sim: SimServer) -> None:
    path = "/api/v5/market/books"
    sim.faults.rest_slow(0.5, count=1, path=path)
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(get_json(session, f"{sim.rest_base}{path}?instId=BTC-USDT"))
        await sim.wait_rest(path)
        assert not task.done()
        status, body = await task
        assert (status, body["code"]) == (200, "0")


async def test_held_rest_answers_wait_until_the_test_releases_them(sim: SimServer) -> None:
    """`rest_hold` gives a test the moment of each answer: held requests are counted on arrival, answered
    only when released (oldest first), and `clear()` changes the rules for newcomers without answering them."""
    path = "/api/v5/market/books"
    url = f"{sim.rest_base}{path}?instId=BTC-USDT"

    def answered() -> int:
        return sum(1 for r in sim.stats.rest_log if r.path == path)

    sim.faults.rest_hold(count=2, path=path)
    async with aiohttp.ClientSession() as session:
        held = {asyncio.create_task(get_json(session, url)) for _ in range(2)}
        assert await sim.wait_rest(path, count=2) == 2  # woken by the arrivals, nothing answered yet
        await sim.wait_until(lambda: sim.faults.rest_held(path) == 2)
        assert (await get_json(session, sim.rest_base + "/api/v5/public/time"))[0] == 200  # other paths: not held
        assert (await get_json(session, url))[0] == 200  # the rule held two: the third is answered at once
        assert (answered(), sim.faults.rest_held(path)) == (1, 2)
        assert sim.faults.rest_release(count=1, path=path) == 1
        done, held = await asyncio.wait(held, return_when=asyncio.FIRST_COMPLETED)
        assert [t.result()[0] for t in done] == [200] and sim.faults.rest_held(path) == 1
        sim.faults.rest_hold(path=path)
        sim.faults.clear()  # no rule left, but the request already held stays held
        assert (await get_json(session, url))[0] == 200
        assert (answered(), sim.faults.rest_held(path)) == (3, 1)
        assert sim.faults.rest_release() == 1 and sim.faults.rest_release() == 0
        (last,) = held
        status, body = await last
        assert (status, body["code"]) == (200, "0")
    assert answered() == 4 and sim.stats.violations == 0


async def test_faults_compose_a_storm_a_stall_and_a_sequence_gap_at_once(sim: SimServer) -> None:
    cfg = sim.config
    async with await Client.connect(sim.ws_url("public")) as books, \
            await Client.connect(sim.ws_url("private")) as private, aiohttp.ClientSession() as session:
        first = await books.subscribe({"channel": "books", "instId": "BTC-USDT"})
        await private.login(cfg.api_key, cfg.api_secret, cfg.passphrase)
        await private.subscribe({"channel": "orders", "instType": "ANY"})
        await sim.wait_subscribed({"channel": "orders"})
        sim.faults.stall(endpoint="private")
        sim.faults.skip_sequence("BTC-USDT")
        sim.faults.rest_rate_limit(2, path="/api/v5/account/balance")
        await sim.account.place_order("BTC-USDT", "buy", "0.01", "40000")
        await sim.tick(4)
        frames = [f for f in first + await books.sync() if "action" in f]
        path = "/api/v5/account/balance"
        codes = [(await get_json(session, sim.rest_base + path,
                                 rest_headers(cfg.api_key, cfg.api_secret, cfg.passphrase, "GET", path)))[1]["code"]
                 for _ in range(3)]
        private_id = sim.connections("private")[0].conn_id
    gaps = sum(1 for a, b in pairwise(frames)
               if b["data"][0]["prevSeqId"] != a["data"][0]["seqId"])
    assert gaps == 1
    assert codes == ["50011", "50011", "0"]
    assert sim.stats.connections[private_id].frames_dropped >= 1


async def test_a_connection_whose_buffer_overflows_is_closed_with_4005() -> None:
    async with SimServer(SimConfig(max_queue_frames=5, **creds())) as sim, \
            await Client.connect(sim.ws_url("public")) as c:
        await c.subscribe({"channel": "trades", "instId": "BTC-USDT"})
        [conn_id] = await sim.wait_subscribed({"channel": "trades"})
        await sim.pump_trades("BTC-USDT", 20)
        assert await c.wait_closed() == 4005
        assert c.ws.close_reason == "Buffer is full, cannot write data."
    assert sim.stats.connections[conn_id].frames_overflowed > 0


async def test_a_client_that_stops_reading_gets_what_its_socket_took_then_4005_and_never_the_rest() -> None:
    """OKX's slow-consumer rule with real sockets: the client reads nothing, TCP fills, the simulator's buffer
    overflows; what was written before is still delivered, in order, then 4005; what overflowed never is."""
    config = SimConfig(max_queue_frames=500, flush_timeout_s=0.05, compress=False, **creds())
    async with SimServer(config) as sim, await Client.connect(sim.ws_url("business"), max_queue=4) as c:
        await c.subscribe({"channel": "trades-all", "instId": "BTC-USDT"})
        [conn_id] = await sim.wait_subscribed({"channel": "trades-all"})
        stats = sim.stats.connections[conn_id]
        async with asyncio.timeout(60):
            while not stats.frames_overflowed:  # nothing is read meanwhile: the socket's buffers fill up
                await sim.pump(sim.prepare_trades("BTC-USDT", 200), batch=100)
        got: list[str] = []
        with pytest.raises(websockets.ConnectionClosedError):
            while True:
                got += [t["tradeId"] for t in json.loads(await asyncio.wait_for(c.ws.recv(), 10))["data"]]
        assert c.ws.close_code == 4005
    sent = [r.trade_id for r in sim.market.trades("BTC-USDT")]
    assert got == sent[:len(got)] and len(got) == stats.frames_sent - 1  # all but the ack, in order
    assert len(sent) - len(got) >= stats.frames_overflowed > 0  # the rest never left
