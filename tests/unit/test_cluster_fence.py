"""The fence of cluster mode: what a replica publishes once its lease expired or its shards moved."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import orjson
from hypothesis import given
from hypothesis import strategies as st

from ingest.config import OkxSettings, WsSettings
from ingest.core.cluster import StreamPosition, shard_of
from ingest.core.encoded import EncodedRecord
from ingest.core.events import Inbound
from ingest.core.gaps import StreamCheckpoint
from ingest.io.cluster import Assignment, Lease, ShardAssignor
from ingest.io.delivery import DeliveryStats
from ingest.okx.channels import SubArg
from ingest.services.cluster import ClusterPositions, FencedOutlet, ShardConnections, record_shard
from ingest.services.handover import Handovers

SHARDS = 8
GAPS = "p.gaps"


class _Capture:
    """A capture outlet (what delivery would be handed)."""

    def __init__(self) -> None:
        self.records: list[EncodedRecord] = []

    async def put_many(self, records: Sequence[EncodedRecord]) -> None:
        self.records.extend(records)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _trade(inst: str) -> EncodedRecord:
    return EncodedRecord("p.trades", inst.encode(), b"v", (("schema", b"okx.ingest.v1.Trade"),), 1)


def test_a_record_belongs_to_the_shard_of_its_instrument_or_connection() -> None:
    assert record_shard(_trade("BTC-USDT"), GAPS, SHARDS) == shard_of("BTC-USDT", SHARDS)
    gap = EncodedRecord(GAPS, b"trades:ETH-USDT", b"v")
    assert record_shard(gap, GAPS, SHARDS) == shard_of("ETH-USDT", SHARDS)
    raw = EncodedRecord("p.raw", b"s5-public-0#1-ab12", b"v")
    assert record_shard(raw, GAPS, SHARDS) == 5
    assert record_shard(EncodedRecord("p.x", None, b"v"), GAPS, SHARDS) is None


async def test_a_replica_whose_lease_expired_or_whose_shard_moved_publishes_nothing_for_it() -> None:
    queue: asyncio.Queue[Inbound] = asyncio.Queue()
    shards = ShardConnections(OkxSettings(instruments=[]), WsSettings(), queue, [], SHARDS, member="r0")
    clock = _Clock()
    lease = Lease(9.0, monotonic=clock)
    capture = _Capture()
    outlet = FencedOutlet(capture, shards, lease, GAPS)
    mine, theirs = "BTC-USDT", next(f"I{i}" for i in range(100) if shard_of(f"I{i}", SHARDS) != shard_of(
        "BTC-USDT", SHARDS))
    runner = asyncio.create_task(shards.run())
    try:
        await outlet.put_many([_trade(mine)])
        assert capture.records == [] and outlet.fenced == 1, "nothing before the first assignment"
        await shards.apply(Assignment(4, frozenset({shard_of(mine, SHARDS)})))
        lease.renew(clock.now)
        await outlet.put_many([_trade(mine), _trade(theirs)])
        assert [r.key for r in capture.records] == [mine.encode()]
        assert dict(capture.records[0].headers) == {"schema": b"okx.ingest.v1.Trade", "owner": b"r0",
                                                    "generation": b"4",
                                                    "shard": str(shard_of(mine, SHARDS)).encode()}
        # Paused past the session (SIGSTOP): on waking, before any heartbeat, nothing goes out, its own shard's
        # record is held; the rejoin after the expired session gives it fresh shards: what was held is dropped.
        clock.now += 30
        await outlet.put_many([_trade(mine), _trade(theirs)])
        assert len(capture.records) == 1 and outlet.fenced == 3 and outlet.held == 1
        await shards.apply(Assignment(6, frozenset({shard_of(mine, SHARDS)}), resumed=False))
        lease.renew(clock.now)
        await outlet.put_many([_trade(mine)])
        assert [dict(r.headers)["generation"] for r in capture.records] == [b"4", b"6"]
        assert outlet.fenced == 4 and outlet.held == 0
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_records_held_through_a_lapsed_lease_go_out_first_when_the_shard_was_kept() -> None:
    """The broker still counted the member (a heartbeat late by less than the lease's margin): nobody else
    recorded its shards, so dropping what it received meanwhile would lose it with no gap to show."""
    queue: asyncio.Queue[Inbound] = asyncio.Queue()
    shards = ShardConnections(OkxSettings(instruments=[]), WsSettings(), queue, [], SHARDS, member="r0")
    clock = _Clock()
    lease = Lease(9.0, monotonic=clock)
    capture = _Capture()
    outlet = FencedOutlet(capture, shards, lease, GAPS, hold_max_bytes=3)
    a, b = "BTC-USDT", next(f"I{i}" for i in range(100) if shard_of(f"I{i}", SHARDS) != shard_of("BTC-USDT", SHARDS))
    runner = asyncio.create_task(shards.run())
    try:
        await shards.apply(Assignment(4, frozenset({shard_of(a, SHARDS), shard_of(b, SHARDS)})))
        lease.renew(clock.now)
        await outlet.put_many([_trade(a)])
        clock.now += 10  # the lease lapses
        held = [EncodedRecord("p.trades", k.encode(), v, (), 2) for k, v in ((a, b"1"), (b, b"2"), (a, b"3"))]
        await outlet.put_many(held)
        await outlet.put_many([EncodedRecord("p.trades", a.encode(), b"4", (), 3)])  # past hold_max_bytes: lost
        assert len(capture.records) == 1 and outlet.held == 3 and outlet.fenced == 1
        # The next heartbeat is answered and a rebalance keeps a's shard only: b's held record is dropped.
        lease.renew(clock.now)
        await shards.apply(Assignment(5, frozenset({shard_of(a, SHARDS)})))
        await outlet.put_many([EncodedRecord("p.trades", a.encode(), b"5", (), 4)])
        assert [r.value for r in capture.records] == [b"v", b"1", b"3", b"5"]
        assert [dict(r.headers)["generation"] for r in capture.records] == [b"4", b"4", b"4", b"5"]
        assert outlet.held == 0 and outlet.fenced == 2
        # A quiet stream: the positions' timer releases what was held, with no new record to carry it.
        clock.now += 10
        await outlet.put_many([EncodedRecord("p.trades", a.encode(), b"6", (), 5)])
        await outlet.release_held()
        assert outlet.held == 1, "still expired: nothing released"
        lease.renew(clock.now)
        await outlet.release_held()
        assert [r.value for r in capture.records][-1] == b"6" and outlet.held == 0
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_after_an_expired_session_the_shards_got_back_start_afresh() -> None:
    queue: asyncio.Queue[Inbound] = asyncio.Queue()
    shards = ShardConnections(OkxSettings(instruments=[]), WsSettings(), queue, [], SHARDS, member="r0")
    runner = asyncio.create_task(shards.run())
    try:
        await shards.apply(Assignment(1, frozenset({1, 2})))
        await shards.apply(Assignment(2, frozenset({1, 3})))
        assert shards.ownership is not None and dict(shards.ownership.since) == {1: 1, 3: 2}
        await shards.apply(Assignment(5, frozenset({1}), resumed=False))
        assert dict(shards.ownership.since) == {1: 5}
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


def test_the_lease_holds_through_a_join_begun_in_time_and_not_through_one_begun_after_expiry() -> None:
    clock = _Clock()
    lease = Lease(5.0, monotonic=clock)
    assert not lease.valid(), "no lease before the first heartbeat or assignment"
    lease.renew(clock.now)
    clock.now += 4
    lease.join_started()  # a rebalance: aiokafka sends no heartbeat while its JoinGroup waits
    clock.now += 6  # past the last heartbeat's session, within the join's hold (1.5 sessions)
    assert lease.valid()
    lease.join_ended()  # answered, if only with an error: a session from now
    clock.now += 4.9
    assert lease.valid()
    clock.now += 0.2
    assert not lease.valid() and lease.expired_once
    lease.renew(clock.now)
    clock.now += 6  # paused past the session, then the rejoin starts: it does not revive the lease
    lease.join_started()
    assert not lease.valid()
    lease.join_ended()
    assert not lease.valid()


def test_a_process_paused_in_the_middle_of_a_join_is_not_a_member_when_it_wakes() -> None:
    clock = _Clock()
    lease = Lease(5.0, monotonic=clock)
    lease.renew(clock.now)
    lease.join_started()
    clock.now += 20  # SIGSTOP while the JoinGroup waited; SIGCONT
    assert not lease.valid()
    lease.join_ended()  # the join's answer arrives late: it renews nothing
    assert not lease.valid()


def test_a_member_whose_session_expired_claims_none_of_its_old_shards() -> None:
    clock = _Clock()
    lease = Lease(5.0, monotonic=clock)
    assignor = ShardAssignor("r0", "p.shards", lease)
    assignor.held = frozenset({1, 2})
    lease.renew(clock.now)
    assert orjson.loads(assignor.metadata(["p.shards"]).user_data)["held"] == [1, 2]
    clock.now += 30
    lease.join_started()
    assert orjson.loads(assignor.metadata(["p.shards"]).user_data)["held"] == []


class _Pipeline:
    """The pipeline's side of a positions save: its checkpoint names one stream of shard `shard`."""

    def __init__(self, arg: SubArg) -> None:
        self.arg = arg

    async def between_batches(self) -> None:
        return None

    def checkpoint(self) -> tuple[list[StreamCheckpoint], None]:
        return [StreamCheckpoint(self.arg, None, None, None)], None


class _Delivery:
    def __init__(self) -> None:
        self.stats = DeliveryStats()
        self.handed: list[EncodedRecord] = []

    async def put_many(self, records: Sequence[EncodedRecord]) -> None:
        self.handed.extend(records)
        self.stats.records_in += len(records)  # acknowledged at once

    async def wait_for(self, predicate: Callable[[DeliveryStats], bool]) -> None:
        assert predicate(self.stats)


class _Store:
    def __init__(self) -> None:
        self.saved: list[StreamPosition] = []

    async def write(self, positions: list[StreamPosition]) -> int:
        self.saved.extend(positions)
        return len(positions)


async def test_no_position_is_saved_past_records_still_held_for_a_lapsed_lease() -> None:
    """A saved position says every record before it is on Kafka: with records held, a takeover starting from
    it would never report them."""
    arg = SubArg("trades", "BTC-USDT")
    shard = shard_of("BTC-USDT", SHARDS)
    queue: asyncio.Queue[Inbound] = asyncio.Queue()
    okx = OkxSettings(instruments=["BTC-USDT"], ws_base_url="ws://127.0.0.1:9")  # nothing listens there
    shards = ShardConnections(okx, WsSettings(), queue, [arg], SHARDS, member="r0")
    clock = _Clock()
    lease = Lease(9.0, monotonic=clock)
    delivery, store = _Delivery(), _Store()
    fence = FencedOutlet(delivery, shards, lease, GAPS)
    positions = ClusterPositions(cast(Any, _Pipeline(arg)), cast(Any, delivery), cast(Any, store), shards, "r0",
                                 2.0, lease, fence=fence)
    gained = asyncio.Event()

    async def restore(_: Mapping[int, Sequence[SubArg]]) -> None:
        gained.set()  # its connections start as this returns

    shards.on_gain = restore
    runner = asyncio.create_task(shards.run())
    try:
        await shards.apply(Assignment(4, frozenset({shard})))
        await gained.wait()
        assert shards.recording == {shard}
        clock.now += 30  # never renewed: expired
        await fence.put_many([_trade("BTC-USDT")])
        assert await positions.save() == 0 and store.saved == [] and delivery.handed == []
        lease.renew(clock.now)
        assert await positions.save() == 1, "renewed: the held record goes out first, then the position is saved"
        assert [r.key for r in delivery.handed] == [b"BTC-USDT"] and store.saved[0].shard == shard
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_a_shard_just_assigned_is_not_recorded_here_until_its_positions_were_restored() -> None:
    """Its positions are not written from this replica's stale state over its last owner's (which the restore
    is reading): the positions writer follows `recording`, not the assignment."""
    queue: asyncio.Queue[Inbound] = asyncio.Queue()
    first = "BTC-USDT"
    second = next(f"I{i}" for i in range(100) if shard_of(f"I{i}", SHARDS) != shard_of(first, SHARDS))
    a, b = shard_of(first, SHARDS), shard_of(second, SHARDS)
    okx = OkxSettings(instruments=[first, second], ws_base_url="ws://127.0.0.1:9")  # nothing listens there
    args = [SubArg("trades-all", inst_id=first), SubArg("trades-all", inst_id=second)]
    shards = ShardConnections(okx, WsSettings(), queue, args, SHARDS, member="r0")
    during: list[tuple[frozenset[int], frozenset[int]]] = []
    called = asyncio.Queue[None]()
    restored = asyncio.Event()

    async def restore(gained: Mapping[int, Sequence[SubArg]]) -> None:
        during.append((frozenset(gained), shards.recording))
        called.put_nowait(None)
        await restored.wait()

    shards.on_gain = restore
    runner = asyncio.create_task(shards.run())
    try:
        await shards.apply(Assignment(1, frozenset({a})))
        await called.get()
        assert shards.owned == {a} and during == [(frozenset({a}), frozenset())], "assigned, restoring"
        restored.set()
        await shards.apply(Assignment(2, frozenset({a, b})))
        await called.get()  # the round of generation 1 ended before this one's restore
        assert during[1] == (frozenset({b}), frozenset({a})), "started: recorded here"
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


class _Channel:
    """A control topic that only records what is written."""

    def __init__(self) -> None:
        self.sent: list[object] = []
        self.messages: asyncio.Queue[object] = asyncio.Queue()
        self.latest: dict[int, object] = {}

    async def send(self, msg: object) -> None:
        self.sent.append(msg)


async def test_the_last_member_stopping_keeps_publishing_every_shard_until_its_connections_close() -> None:
    """Nobody to hand to: no release, no `leaving`, and what its connections still deliver is published."""
    queue: asyncio.Queue[Inbound] = asyncio.Queue()
    shards = ShardConnections(OkxSettings(instruments=[]), WsSettings(), queue, [], SHARDS, member="r0")
    channel = _Channel()
    by_shard = {s: [SubArg("trades-all", inst_id=f"I{s}")] for s in range(SHARDS)}
    shards.handovers = Handovers(channel, "r0", by_shard, 10.0, GAPS)  # type: ignore[arg-type]
    clock = _Clock()
    lease = Lease(9.0, monotonic=clock)
    capture = _Capture()
    outlet = FencedOutlet(capture, shards, lease, GAPS)
    await shards.apply(Assignment(3, frozenset(range(SHARDS))))
    lease.renew(clock.now)
    await shards.leave()
    assert channel.sent == [] and not shards.handovers.releasing
    await outlet.put_many([_trade("BTC-USDT")])
    assert [r.key for r in capture.records] == [b"BTC-USDT"] and outlet.fenced == 0
    await shards.apply(Assignment(4, frozenset(range(SHARDS - 1))))  # a member joined: shard 7 moves to it
    await shards.leave()
    assert shards.owned == frozenset() and shards.handovers.releasing == frozenset(range(SHARDS)), \
        "not the last member: it hands every shard over"


@given(st.lists(st.tuples(st.sampled_from([1, 2]), st.sampled_from(["trades-all:A", "trades-all:B", "books:A"]),
                          st.one_of(st.integers(-3, 50), st.just("x"))), max_size=30))
def test_a_batch_notes_the_same_last_positions_as_its_records_one_by_one(rows: list[tuple[int, str, object]]) -> None:
    """The fence parses only each stream's last event key of a batch: the positions a release starts from must
    be those of noting every record (a last record without a position leaves the one before it)."""
    from ingest.services.cluster import _event_key, _note_batch, _note_unit

    def _note_last(last: dict[int, dict[str, int]], shard: int, rec: EncodedRecord) -> None:
        """The rule, one record at a time: its stream's position, when its event key has one."""
        key = _event_key(rec.headers)
        if key is not None:
            _note_unit(last, shard, key)

    batch = [(shard, EncodedRecord("p.t", b"k", b"v", (("schema", b"s"), ("record_id", b"r"), ("source", b"ws"),
                                                       ("event_key", f"{stream}:{n}".encode()))))
             for shard, stream, n in rows]
    one_by_one: dict[int, dict[str, int]] = {}
    for shard, rec in batch:
        _note_last(one_by_one, shard, rec)
    batched: dict[int, dict[str, int]] = {}
    _note_batch(batched, batch)
    assert batched == one_by_one
