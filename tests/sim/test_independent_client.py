"""An independent client (plain websockets/aiohttp, hand-written HMAC, no ingest.okx) proves the simulator speaks
OKX: it logs in, follows a book's seqId chain and rebuilds the book exactly, and recovers every pushed trade
by paging REST history back to the start.
"""

from __future__ import annotations

from decimal import Decimal

import aiohttp

from ingest.sim import SimServer
from tests.sim.wsclient import Client, Frame, get_json, pushes, rest_headers


def apply_levels(book: dict[str, dict[Decimal, list[str]]], data: Frame) -> None:
    for side in ("asks", "bids"):
        for level in data[side]:
            price = Decimal(level[0])
            if Decimal(level[1]) == 0:
                book[side].pop(price, None)
            else:
                book[side][price] = level


def sorted_levels(book: dict[str, dict[Decimal, list[str]]], side: str, n: int) -> list[list[str]]:
    keys = sorted(book[side], reverse=side == "bids")[:n]
    return [book[side][k] for k in keys]


async def test_independent_client_follows_the_book_chain_and_recovers_every_trade_over_rest(sim: SimServer) -> None:
    cfg = sim.config
    async with await Client.connect(sim.ws_url("public")) as public, \
            await Client.connect(sim.ws_url("business")) as business:
        login = await public.login(cfg.api_key, cfg.api_secret, cfg.passphrase)
        assert login == {"event": "login", "code": "0", "msg": "", "connId": login["connId"]}
        first = await public.subscribe({"channel": "books-l2-tbt", "instId": "BTC-USDT"},
                                       {"channel": "trades", "instId": "BTC-USDT"})
        await business.subscribe({"channel": "trades-all", "instId": "BTC-USDT"})
        await sim.wait_subscribed({"channel": "trades-all", "instId": "BTC-USDT"})
        await sim.tick(120)
        public_frames = first + await public.sync()
        business_frames = await business.sync()

    book_frames = pushes(public_frames, "books-l2-tbt")
    assert book_frames[0]["action"] == "snapshot" and book_frames[0]["data"][0]["prevSeqId"] == -1
    book: dict[str, dict[Decimal, list[str]]] = {"asks": {}, "bids": {}}
    last_seq = None
    for frame in book_frames:
        data = frame["data"][0]
        if frame["action"] == "update":
            assert data["prevSeqId"] == last_seq, "the chain must link message to message"
            assert data["seqId"] > data["prevSeqId"]
        apply_levels(book, data)
        last_seq = data["seqId"]
    assert len(book_frames) > 50

    async with aiohttp.ClientSession() as session:
        status, books = await get_json(session, f"{sim.rest_base}/api/v5/market/books?instId=BTC-USDT&sz=400")
        assert status == 200
        assert books["data"][0]["seqId"] == last_seq
        assert books["data"][0]["asks"] == sorted_levels(book, "asks", 400)
        assert books["data"][0]["bids"] == sorted_levels(book, "bids", 400)

        rest_rows: list[Frame] = []
        after = ""
        while True:
            url = f"{sim.rest_base}/api/v5/market/history-trades?instId=BTC-USDT&limit=100{after}"
            status, page = await get_json(session, url)
            assert status == 200 and page["code"] == "0"
            if not page["data"]:
                break
            ids = [int(r["tradeId"]) for r in page["data"]]
            assert ids == sorted(ids, reverse=True), "newest first"
            rest_rows += page["data"]
            after = f"&after={page['data'][-1]['tradeId']}"

        path = "/api/v5/account/balance?ccy=USDT"
        status, balance = await get_json(session, sim.rest_base + path,
                                         rest_headers(cfg.api_key, cfg.api_secret, cfg.passphrase, "GET", path))
        assert status == 200 and balance["data"][0]["details"][0]["ccy"] == "USDT"

    pushed_all = [f["data"][0] for f in pushes(business_frames, "trades-all")]
    by_id = {r["tradeId"]: r for r in rest_rows}
    assert len(by_id) == len(rest_rows) > 20
    assert sorted(by_id, key=int) == [t["tradeId"] for t in pushed_all]
    for t in pushed_all:
        row = by_id[t["tradeId"]]
        assert (row["px"], row["sz"], row["side"], row["ts"], row["source"]) == (t["px"], t["sz"], t["side"],
                                                                                 t["ts"], t["source"])
    # `trades` aggregates: tradeId is the last id, `count` the matches; together they cover every REST row.
    covered: list[str] = []
    for frame in pushes(public_frames, "trades"):
        agg = frame["data"][0]
        last, count = int(agg["tradeId"]), int(agg["count"])
        rows = [by_id[str(i)] for i in range(last - count + 1, last + 1)]
        assert all((r["px"], r["side"], r["ts"]) == (agg["px"], agg["side"], agg["ts"]) for r in rows)
        assert sum(Decimal(r["sz"]) for r in rows) == Decimal(agg["sz"])
        covered += [r["tradeId"] for r in rows]
    assert covered == sorted(by_id, key=int)
