"""Fidelity: every frame and REST body the simulator produces has the keys and JSON types of the real (or
documented) OKX messages in shared/okx/frames/. Values are not compared; shapes are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from ingest.sim import SimServer
from tests.sim.shapes import load_jsonl, shape_diff
from tests.sim.wsclient import Client, Frame, get_json, rest_headers

DOCS = "frames/okx_docs_examples"
#: channel -> (reference file, channel name inside it, keys only we have, keys only the reference has)
PUSH_REFERENCES: dict[str, tuple[str, str, frozenset[str], frozenset[str]]] = {
    "trades": ("frames/trades.jsonl", "trades", frozenset(), frozenset()),
    # `source` was added to trades-all on 2025-11-26 (SPEC 0); both references predate it.
    "trades-all": ("frames/trades-all.jsonl", "trades-all", frozenset({"source"}), frozenset()),
    "tickers": ("frames/tickers.jsonl", "tickers", frozenset(), frozenset()),
    "books": (f"{DOCS}/okxdoc_2026zh_books.jsonl", "books", frozenset(), frozenset()),
    "books-l2-tbt": (f"{DOCS}/okxdoc_2026zh_books.jsonl", "books", frozenset(), frozenset()),
    "books50-l2-tbt": (f"{DOCS}/okxdoc_2026zh_books.jsonl", "books", frozenset(), frozenset()),
    "books5": ("frames/books5.jsonl", "books5", frozenset(), frozenset()),
    "bbo-tbt": (f"{DOCS}/okxdoc_2026zh_books.jsonl", "bbo-tbt", frozenset(), frozenset()),
    "candle1m": ("frames/candle1m.jsonl", "candle1m", frozenset(), frozenset()),
    "mark-price": ("frames/tardis_mark-price.jsonl", "mark-price", frozenset(), frozenset()),
    "index-tickers": ("frames/tardis_index-tickers.jsonl", "index-tickers", frozenset(), frozenset()),
    "funding-rate": (f"{DOCS}/okxdoc_2025_funding-rate.jsonl", "funding-rate", frozenset(), frozenset()),
    "open-interest": (f"{DOCS}/okxdoc_2025_open-interest.jsonl", "open-interest", frozenset(), frozenset()),
    # SPEC 5 lists instType for price-limit (the real tardis frame has it); the doc example omits it.
    "price-limit": (f"{DOCS}/okxdoc_2025_price-limit.jsonl", "price-limit", frozenset({"instType"}), frozenset()),
    "liquidation-orders": ("frames/tardis_liquidation-orders.jsonl", "liquidation-orders", frozenset(),
                           frozenset()),
    "instruments": (f"{DOCS}/okxdoc_2025_instruments.jsonl", "instruments", frozenset(), frozenset()),
    "orders": (f"{DOCS}/okxdoc_2025_orders.jsonl", "orders", frozenset(), frozenset()),
    "fills": (f"{DOCS}/okxdoc_2025_fills.jsonl", "fills", frozenset(), frozenset()),
    "positions": (f"{DOCS}/okxdoc_2025_positions.jsonl", "positions", frozenset(), frozenset({"lastPage"})),
    # event_update pushes carry no lastPage (SPEC 6: lastPage is for snapshots).
    "account": (f"{DOCS}/okxdoc_2025_account.jsonl", "account", frozenset(), frozenset({"lastPage"})),
    "balance_and_position": (f"{DOCS}/okxdoc_2025_balance_and_position.jsonl", "balance_and_position", frozenset(),
                             frozenset()),
    "orders-algo": (f"{DOCS}/okxdoc_2025_orders-algo.jsonl", "orders-algo", frozenset(), frozenset()),
}


def reference(shared: Path, rel: str, channel: str, action: str | None) -> Frame:
    frames = [f for f in load_jsonl(shared / rel) if "data" in f and f.get("arg", {}).get("channel") == channel]
    assert frames, f"no {channel} push in {rel}"
    if channel == "positions":
        return frames[-1]  # the ANY example carries every documented field (usdPx, bePx)
    for f in frames:
        if action is None or f.get("action") == action:
            return f
    return frames[0]


async def collect_all_channels(sim: SimServer) -> dict[str, list[Frame]]:
    """Subscribe to every simulated channel on the right endpoints, drive the market and the account, and
    return the pushes received per channel."""
    cfg = sim.config
    creds = (cfg.api_key, cfg.api_secret, cfg.passphrase)
    public = await Client.connect(sim.ws_url("public"))
    business = await Client.connect(sim.ws_url("business"))
    private = await Client.connect(sim.ws_url("private"))
    received: dict[str, list[Frame]] = {}
    try:
        assert (await public.login(*creds))["code"] == "0"
        assert (await business.login(*creds))["code"] == "0"
        assert (await private.login(*creds))["code"] == "0"
        acks = await public.subscribe(
            {"channel": "tickers", "instId": "BTC-USDT"}, {"channel": "trades", "instId": "BTC-USDT"},
            {"channel": "books", "instId": "BTC-USDT"}, {"channel": "books5", "instId": "ETH-USDT"},
            {"channel": "bbo-tbt", "instId": "ETH-USDT"}, {"channel": "books-l2-tbt", "instId": "ETH-USDT"},
            {"channel": "books50-l2-tbt", "instId": "BTC-USDT-SWAP"},
            {"channel": "mark-price", "instId": "BTC-USDT-SWAP"}, {"channel": "index-tickers", "instId": "BTC-USDT"},
            {"channel": "funding-rate", "instId": "BTC-USDT-SWAP"},
            {"channel": "open-interest", "instId": "BTC-USDT-SWAP"},
            {"channel": "price-limit", "instId": "BTC-USDT-SWAP"},
            {"channel": "liquidation-orders", "instType": "SWAP"}, {"channel": "instruments", "instType": "SPOT"})
        assert not [a for a in acks if a.get("event") == "error"], acks
        await business.subscribe({"channel": "trades-all", "instId": "BTC-USDT"},
                                 {"channel": "candle1m", "instId": "BTC-USDT"},
                                 {"channel": "orders-algo", "instType": "ANY"})
        await private.subscribe({"channel": "orders", "instType": "ANY"}, {"channel": "fills"},
                                {"channel": "positions", "instType": "ANY"}, {"channel": "account"},
                                {"channel": "balance_and_position"})
        await sim.tick(310)  # past one funding-rate (300 steps) and several open-interest (30 steps) pushes
        sim.market.force_liquidation("BTC-USDT-SWAP")
        sim.market.set_instrument_state("BTC-USDT", "suspend")
        await sim.tick(1)
        ord_id = await sim.account.place_order("BTC-USDT-SWAP", "buy", "2", "43000.5")
        await sim.account.fill(ord_id, "1")
        spot = await sim.account.place_order("BTC-USDT", "buy", "0.01", "43000")
        await sim.account.fill(spot)
        algo = await sim.account.place_algo("BTC-USDT-SWAP", "sell", "1", "42000.1")
        await sim.account.trigger_algo(algo)
        for client in (public, business, private):
            for frame in [*acks, *await client.sync()]:
                if "data" in frame:
                    received.setdefault(frame["arg"]["channel"], []).append(frame)
    finally:
        for client in (public, business, private):
            await client.ws.close()
    return received


async def test_every_pushed_channel_has_the_keys_and_types_of_real_okx_frames(sim: SimServer,
                                                                               shared_okx: Path) -> None:
    received = await collect_all_channels(sim)
    problems: list[str] = []
    for channel, (rel, ref_channel, extra_ok, missing_ok) in PUSH_REFERENCES.items():
        ours = received.get(channel, [])
        if not ours:
            problems.append(f"{channel}: nothing pushed")
            continue
        for frame in ours:
            ref = reference(shared_okx, rel, ref_channel, frame.get("action"))
            # `arg` echoes the subscription (which differs from the reference's); private pushes add `uid`.
            assert ("uid" in frame["arg"]) == ("uid" in ref["arg"]), (channel, frame["arg"])
            body = {k: v for k, v in frame.items() if k != "arg"}
            ref_body = {k: v for k, v in ref.items() if k not in ("arg", "id")}
            problems += [f"{channel}: {p}" for p in shape_diff(body, ref_body, extra_ok=extra_ok,
                                                               missing_ok=missing_ok)]
    assert not problems, "\n".join(sorted(set(problems))[:40])


async def test_book_levels_and_candles_have_okx_array_lengths(sim: SimServer) -> None:
    received = await collect_all_channels(sim)
    for channel in ("books", "books5", "bbo-tbt", "books-l2-tbt", "books50-l2-tbt"):
        for frame in received[channel]:
            for side in ("asks", "bids"):
                assert all(len(level) == 4 and level[2] == "0" for level in frame["data"][0][side])
    for frame in received["candle1m"]:
        assert len(frame["data"][0]) == 9 and frame["data"][0][8] in ("0", "1")


async def test_older_captures_are_subsets_of_what_the_simulator_sends(sim: SimServer, shared_okx: Path) -> None:
    """Real 2021-2022 frames (before seqId, count, source) have no key the simulator lacks."""
    received = await collect_all_channels(sim)
    for rel, channel in (("frames/tardis_books-l2-tbt.jsonl", "books-l2-tbt"),
                         ("frames/books.jsonl", "books"), ("frames/tardis_trades.jsonl", "trades"),
                         ("frames/cryptofeed_2022_trades.jsonl", "trades"),
                         ("frames/tardis_tickers.jsonl", "tickers"), ("frames/tardis_bbo-tbt.jsonl", "bbo-tbt"),
                         ("frames/orders.jsonl", "orders"), ("frames/ccxt_comment_2023_positions.jsonl", "positions")):
        ours = received[channel][-1]["data"][0]
        for ref in load_jsonl(shared_okx / rel):
            if "data" not in ref:
                continue
            # the 2023 positions comment sample has margin-era fields OKX dropped (baseBal, quoteBal...)
            legacy = {"baseBal", "quoteBal", "baseBorrowed", "baseInterest", "quoteBorrowed", "quoteInterest"}
            missing = [k for k in ref["data"][0] if k not in ours and k not in legacy]
            assert not missing, f"{rel}: simulator lacks {missing}"


async def test_acks_errors_login_and_notice_have_the_captured_shapes(sim: SimServer, shared_okx: Path) -> None:
    frames = shared_okx / "frames"
    ack_ref = load_jsonl(frames / "ccxt_2026_subscribe_acks.jsonl")[0]
    ack_id_ref = load_jsonl(frames / DOCS.removeprefix("frames/") / "okxdoc_2025_subscribe.jsonl")[2]
    unsub_ref = load_jsonl(frames / DOCS.removeprefix("frames/") / "okxdoc_2025_unsubscribe.jsonl")[2]
    error_ref = load_jsonl(frames / "issues_ws_errors.jsonl")[0]
    error_60018_ref = load_jsonl(frames / "issues_ws_errors_converted_from_repr.jsonl")[3]
    login_ref = load_jsonl(frames / "login.jsonl")[1]
    notice_ref = load_jsonl(frames / DOCS.removeprefix("frames/") / "okxdoc_2025_notice.jsonl")[0]
    count_ref, count_error_ref = load_jsonl(frames / DOCS.removeprefix("frames/") / "okxdoc_2025_conn-count.jsonl")
    cfg = sim.config
    async with await Client.connect(sim.ws_url("public")) as c:
        ack = (await c.subscribe({"channel": "tickers", "instId": "BTC-USDT"}))[0]
        assert shape_diff(ack, ack_ref) == []
        await c.request("subscribe", [{"channel": "trades", "instId": "BTC-USDT"}], req_id="1512")
        ack_id, _ = await c.recv_until(lambda f: f.get("event") == "subscribe")
        assert ack_id["id"] == "1512" and shape_diff(ack_id, ack_id_ref) == []
        await c.request("unsubscribe", [{"channel": "tickers", "instId": "BTC-USDT"}])
        unsub, _ = await c.recv_until(lambda f: f.get("event") == "unsubscribe")
        assert shape_diff(unsub, unsub_ref) == []
        error = await c.login(cfg.api_key, cfg.api_secret, cfg.passphrase, ts="1538054050")
        assert error["code"] == "60006" and shape_diff(error, error_ref) == []
        wrong = (await c.subscribe({"channel": "candle1s-x", "instId": "BTC-USDT-SWAP"}))[0]
        assert shape_diff(wrong, error_60018_ref) == []
        login = await c.login(cfg.api_key, cfg.api_secret, cfg.passphrase)
        assert shape_diff(login, login_ref) == []
        sim.faults.notice(close_after_s=30)
        notice, _ = await c.recv_until(lambda f: f.get("event") == "notice")
        assert shape_diff(notice, notice_ref) == []
    async with await Client.connect(sim.ws_url("private")) as p:
        await p.login(cfg.api_key, cfg.api_secret, cfg.passphrase)
        await p.request("subscribe", [{"channel": "orders", "instType": "ANY"}])
        conn_count, _ = await p.recv_until(lambda f: f.get("event") == "channel-conn-count")
        assert shape_diff(conn_count, count_ref) == []
    assert count_error_ref["event"] == "channel-conn-count-error"  # checked in test_account


async def rest_bodies(sim: SimServer) -> dict[str, Any]:
    """One real response per documented REST endpoint (private ones signed by hand)."""
    cfg = sim.config
    ord_id = await sim.account.place_order("BTC-USDT", "buy", "0.01", "43000")
    await sim.account.fill(ord_id)
    swap = await sim.account.place_order("BTC-USDT-SWAP", "buy", "1", "43000")
    await sim.account.fill(swap)
    await sim.tick(20)
    paths = {
        "rest_time": "/api/v5/public/time",
        "rest_public_instruments": "/api/v5/public/instruments?instType=SPOT",
        "rest_trades": "/api/v5/market/trades?instId=BTC-USDT",
        "rest_history_trades": "/api/v5/market/history-trades?instId=BTC-USDT",
        "rest_books": "/api/v5/market/books?instId=BTC-USDT&sz=5",
        "rest_candles": "/api/v5/market/candles?instId=BTC-USDT",
        "rest_history_candles": "/api/v5/market/history-candles?instId=BTC-USDT",
        "rest_fills": "/api/v5/trade/fills",
        "rest_fills_history": "/api/v5/trade/fills-history?instType=SPOT",
        "rest_orders_history": "/api/v5/trade/orders-history?instType=SPOT",
        "rest_account_balance": "/api/v5/account/balance",
        "rest_account_positions": "/api/v5/account/positions",
        "rest_account_config": "/api/v5/account/config",
    }
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:
        for name, path in paths.items():
            headers = rest_headers(cfg.api_key, cfg.api_secret, cfg.passphrase, "GET", path)
            status, body = await get_json(session, sim.rest_base + path, headers)
            assert status == 200 and body["code"] == "0" and body["data"], (name, body)
            out[name] = body
    return out


async def test_rest_responses_have_the_documented_shapes(sim: SimServer, shared_okx: Path) -> None:
    bodies = await rest_bodies(sim)
    problems = []
    for name, body in bodies.items():
        ref = load_jsonl(shared_okx / DOCS / f"okxdoc_2025_{name}.jsonl")[0]
        # 2026 docs add the integer seqId to GET /market/books; trades rows gained `source` on 2025-11-26 (SPEC 8.3).
        extra = {"rest_books": frozenset({"seqId"}), "rest_trades": frozenset({"source"}),
                 "rest_history_trades": frozenset({"source"})}.get(name, frozenset())
        problems += [f"{name}: {p}" for p in shape_diff(body, ref, extra_ok=extra)]
    assert not problems, "\n".join(problems[:40])


async def test_rest_error_bodies_have_the_captured_shapes(sim: SimServer, shared_okx: Path) -> None:
    frames = shared_okx / "frames"
    bad_key_ref, not_found_ref = load_jsonl(frames / "nautilus_rest_errors_captured_2026.jsonl")
    expired_ref = load_jsonl(frames / "issues_rest_errors.jsonl")[0]
    rate_ref = load_jsonl(frames / "nautilus_rest_error_rate_limit_provenance_unstated.jsonl")[0]
    cfg = sim.config
    async with aiohttp.ClientSession() as session:
        path = "/api/v5/account/balance"
        status, body = await get_json(session, sim.rest_base + path,
                                      rest_headers("not-the-key", cfg.api_secret, cfg.passphrase, "GET", path))
        assert status == 401 and body == bad_key_ref
        status, body = await get_json(session, sim.rest_base + "/api/v5/no/such/path")
        assert status == 404 and body == not_found_ref
        old = rest_headers(cfg.api_key, cfg.api_secret, cfg.passphrase, "GET", path,
                           epoch_ms=sim.clock.now_ms() - 120_000)
        status, body = await get_json(session, sim.rest_base + path, old)
        assert status == 401 and body == expired_ref
        sim.faults.rest_rate_limit(1, status=429)
        status, body = await get_json(session, sim.rest_base + "/api/v5/public/time")
        assert status == 429 and body == rate_ref
