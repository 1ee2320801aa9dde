"""Order books: snapshots, seqId chains, heartbeats, resets, skipped sequences, depth views and CRC32 checksums,
checked with the independent reference checker shared/okx/tools/verify_books.py."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from itertools import pairwise
from pathlib import Path
from typing import Any

from ingest.sim import SimConfig, SimServer
from tests.sim.wsclient import Client, Frame, pushes


def creds() -> dict[str, Any]:
    return {"api_key": secrets.token_hex(16), "api_secret": secrets.token_hex(32), "passphrase": secrets.token_hex(8)}


def verify_books(shared_okx: Path, tmp_path: Path, frames: list[Frame]) -> dict[str, int]:
    """Run the shared reference checker on `frames` and return its counters."""
    path = tmp_path / f"books-{secrets.token_hex(4)}.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in frames))
    out = subprocess.run([sys.executable, str(shared_okx / "tools" / "verify_books.py"), str(path)],
                         capture_output=True, text=True, check=True)
    stats: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return stats


async def book_frames(sim: SimServer, *args: dict[str, str], ticks: int, login: bool = False) -> list[Frame]:
    async with await Client.connect(sim.ws_url("public")) as c:
        if login:
            await c.login(sim.config.api_key, sim.config.api_secret, sim.config.passphrase)
        first = await c.subscribe(*args)
        await sim.tick(ticks)
        return [f for f in first + await c.sync() if "action" in f]


async def test_checksums_when_enabled_verify_with_the_reference_checker(shared_okx: Path, tmp_path: Path) -> None:
    async with SimServer(SimConfig(checksum=True, **creds())) as sim:
        frames = await book_frames(sim, {"channel": "books", "instId": "BTC-USDT"},
                                   {"channel": "books-l2-tbt", "instId": "ETH-USDT"},
                                   {"channel": "books50-l2-tbt", "instId": "BTC-USDT-SWAP"}, ticks=150, login=True)
    for channel in ("books", "books-l2-tbt", "books50-l2-tbt"):
        subset = pushes(frames, channel)
        stats = verify_books(shared_okx, tmp_path, subset)
        assert stats["frames"] == len(subset) > 20
        assert stats["crc_ok"] == len(subset) and stats["crc_bad"] == 0, (channel, stats)
        assert stats["seq_gap"] == 0 and stats["seq_ok"] + stats["seq_keepalive"] == len(subset)
        assert all(f["data"][0]["checksum"] != 0 for f in subset)


async def test_checksum_is_zero_by_default_as_okx_sends_since_2026(sim: SimServer, shared_okx: Path,
                                                                   tmp_path: Path) -> None:
    frames = await book_frames(sim, {"channel": "books", "instId": "BTC-USDT"}, ticks=30)
    assert {f["data"][0]["checksum"] for f in frames} == {0}
    stats = verify_books(shared_okx, tmp_path, frames)
    assert stats["crc_skipped"] == len(frames) and stats["seq_gap"] == 0


async def test_an_idle_book_sends_empty_heartbeat_updates_and_resends_snapshot_channels(
        shared_okx: Path, tmp_path: Path) -> None:
    async with SimServer(SimConfig(heartbeat_ticks=4, **creds())) as sim:
        sim.market.freeze("BTC-USDT")
        async with await Client.connect(sim.ws_url("public")) as c:
            await c.login(sim.config.api_key, sim.config.api_secret, sim.config.passphrase)
            first = await c.subscribe({"channel": "books", "instId": "BTC-USDT"},
                                      {"channel": "books5", "instId": "BTC-USDT"},
                                      {"channel": "books50-l2-tbt", "instId": "BTC-USDT"})
            await sim.tick(9)
            frames = first + await c.sync()
    books = pushes(frames, "books")
    snapshot_seq = books[0]["data"][0]["seqId"]
    heartbeats = books[1:]
    assert len(heartbeats) == 2
    for hb in heartbeats:
        data = hb["data"][0]
        assert hb["action"] == "update" and data["asks"] == [] and data["bids"] == []
        assert data["prevSeqId"] == data["seqId"] == snapshot_seq
    assert verify_books(shared_okx, tmp_path, books)["seq_keepalive"] == 2
    books50 = pushes(frames, "books50-l2-tbt")
    assert [(f["data"][0]["prevSeqId"], f["data"][0]["seqId"]) for f in books50[1:]] == [(snapshot_seq,) * 2] * 2
    books5 = pushes(frames, "books5")
    assert len(books5) == 3 and all(f["data"][0] == {**books5[0]["data"][0], "ts": f["data"][0]["ts"]}
                                    for f in books5)


async def test_a_sequence_reset_is_an_update_below_its_prev_and_the_chain_continues(
        sim: SimServer, shared_okx: Path, tmp_path: Path) -> None:
    async with await Client.connect(sim.ws_url("public")) as c:
        first = await c.subscribe({"channel": "books", "instId": "BTC-USDT"})
        await sim.tick(3)
        sim.faults.reset_sequence("BTC-USDT", to=3)
        await sim.tick(3)
        frames = [f for f in first + await c.sync() if "action" in f]
    resets = [f["data"][0] for f in frames if f["data"][0]["seqId"] < f["data"][0]["prevSeqId"]]
    assert len(resets) == 1 and resets[0]["seqId"] == 3
    for prev, cur in pairwise(frames):
        assert cur["data"][0]["prevSeqId"] == prev["data"][0]["seqId"]
    stats = verify_books(shared_okx, tmp_path, frames)
    assert stats["seq_reset"] == 1 and stats["seq_gap"] == 0


async def test_skip_sequence_breaks_the_chain_only_on_the_chosen_connection(sim: SimServer) -> None:
    async with await Client.connect(sim.ws_url("public")) as c1, await Client.connect(sim.ws_url("public")) as c2:
        f1 = await c1.subscribe({"channel": "books", "instId": "BTC-USDT"})
        f2 = await c2.subscribe({"channel": "books", "instId": "BTC-USDT"})
        holders = await sim.wait_subscribed({"channel": "books"}, count=2)
        sim.faults.skip_sequence("BTC-USDT", conn_id=holders[0])
        await sim.tick(6)
        frames1 = [f for f in f1 + await c1.sync() if "action" in f]
        frames2 = [f for f in f2 + await c2.sync() if "action" in f]

    def gaps(frames: list[Frame]) -> int:
        return sum(1 for a, b in pairwise(frames)
                   if b["data"][0]["prevSeqId"] != a["data"][0]["seqId"])

    assert sorted([gaps(frames1), gaps(frames2)]) == [0, 1]
    assert abs(len(frames1) - len(frames2)) == 1


async def test_books50_keeps_its_own_view_and_chain(sim: SimServer, shared_okx: Path, tmp_path: Path) -> None:
    frames = await book_frames(sim, {"channel": "books50-l2-tbt", "instId": "BTC-USDT"}, ticks=100, login=True)
    snapshot = frames[0]["data"][0]
    assert len(snapshot["asks"]) == 50 and len(snapshot["bids"]) == 50
    stats = verify_books(shared_okx, tmp_path, frames)
    assert stats["seq_gap"] == 0 and stats["seq_ok"] == len(frames)


async def test_snapshot_channels_carry_seq_id_only_and_the_books_depth(sim: SimServer) -> None:
    async with await Client.connect(sim.ws_url("public")) as c:
        first = await c.subscribe({"channel": "books5", "instId": "ETH-USDT"},
                                  {"channel": "bbo-tbt", "instId": "ETH-USDT"},
                                  {"channel": "books", "instId": "ETH-USDT"})
        await sim.tick(20)
        frames = first + await c.sync()
    for channel, depth in (("books5", 5), ("bbo-tbt", 1)):
        got = pushes(frames, channel)
        assert got and all("action" not in f and "prevSeqId" not in f["data"][0] for f in got)
        assert all(len(f["data"][0]["asks"]) == depth == len(f["data"][0]["bids"]) for f in got)
        # only pushed when the visible book changed
        assert all(a["data"][0]["asks"] != b["data"][0]["asks"] or a["data"][0]["bids"] != b["data"][0]["bids"]
                   for a, b in pairwise(got))
    snapshot = pushes(frames, "books")[0]["data"][0]
    assert len(snapshot["asks"]) == 400 == len(snapshot["bids"])


async def test_depth_channels_of_one_instrument_arrive_in_okx_order(sim: SimServer) -> None:
    order = ["bbo-tbt", "books-l2-tbt", "books5"]
    async with await Client.connect(sim.ws_url("public")) as c:
        await c.login(sim.config.api_key, sim.config.api_secret, sim.config.passphrase)
        await c.subscribe(*({"channel": ch, "instId": "BTC-USDT"} for ch in reversed(order)))
        await sim.tick(1)
        frames = await c.sync()
    seen = [f["arg"]["channel"] for f in frames if f["arg"]["channel"] in order]
    assert seen == sorted(seen, key=order.index) and "books-l2-tbt" in seen


async def test_books_l2_tbt_without_login_is_acked_then_refused_with_60011(sim: SimServer,
                                                                          shared_okx: Path) -> None:
    captured = [json.loads(line) for line in
                (shared_okx / "frames/issues_ws_books-l2-tbt_without_login_sequence.jsonl").read_text().splitlines()]
    async with await Client.connect(sim.ws_url("public")) as c:
        await c.request("subscribe", [{"channel": "books-l2-tbt", "instId": "BTC-USDT-SWAP"}])
        ack, error = await c.recv(), await c.recv()
        assert [ack["event"], error["event"], error["code"], error["msg"]] == \
            [captured[0]["event"], captured[1]["event"], captured[1]["code"], captured[1]["msg"]]
        await c.request("subscribe", [{"channel": "books50-l2-tbt", "instId": "BTC-USDT"}])
        assert (await c.recv())["event"] == "subscribe"
        assert (await c.recv())["code"] == "60011"
        await sim.tick(3)
        assert await c.sync() == []


async def test_books_l2_tbt_conflicts_with_books_on_one_connection(sim: SimServer) -> None:
    async with await Client.connect(sim.ws_url("public")) as c:
        await c.login(sim.config.api_key, sim.config.api_secret, sim.config.passphrase)
        await c.subscribe({"channel": "books", "instId": "BTC-USDT"})
        await c.subscribe({"channel": "books-l2-tbt", "instId": "BTC-USDT"})
        held = await sim.wait_subscribed({"channel": "books-l2-tbt"})
        assert [s.channel for s in sim.connection(held[0]).subscriptions] == ["books-l2-tbt"]
        replies = await c.subscribe({"channel": "books50-l2-tbt", "instId": "BTC-USDT"})
        assert replies[-1]["event"] == "error" and replies[-1]["code"] == "64004"
