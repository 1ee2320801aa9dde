"""The hand-over as the fence drives it (services/handover.py), with a fake control topic and a fake clock: the
new owner holds, then publishes past the old owner's cut (dropping its own gap), or on timeout publishes
everything it held, the gap included; the old owner publishes until the cut and then says `released`."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ingest.core.avro import RecordEncoder
from ingest.core.encoded import EncodedRecord
from ingest.core.handover import ControlMessage, Leaving, Prepared, Released, Taken
from ingest.core.identity import EVENT_KEY_HEADER
from ingest.core.records import GapEvent, GapKind, GapStatus, StreamPosition
from ingest.okx.channels import SubArg
from ingest.services.handover import HANDOVER_GAP_REASON, Handovers

STREAM = "trades-all:BTC-USDT"
ENCODER = RecordEncoder("p.")


class _Channel:
    def __init__(self) -> None:
        self.sent: list[ControlMessage] = []
        self.messages: asyncio.Queue[ControlMessage] = asyncio.Queue()
        self.latest: dict[int, ControlMessage] = {}

    async def send(self, msg: ControlMessage) -> None:
        self.sent.append(msg)

    async def caught_up(self, timeout_s: float) -> bool:
        return True


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _trade(n: int) -> EncodedRecord:
    return EncodedRecord("p.trades", b"BTC-USDT", b"v", ((EVENT_KEY_HEADER, f"{STREAM}:{n}".encode()),), 1)


def _gap() -> EncodedRecord:
    return ENCODER.encode(GapEvent(
        gap_id="g1", kind=GapKind.DISCONNECT, status=GapStatus.OPEN, reason=HANDOVER_GAP_REASON,
        channel="trades-all", inst_id="BTC-USDT", before=StreamPosition(trade_id=4, ts=1),
        after=StreamPosition(trade_id=9, ts=2), detected_ts_ns=1))


def _service(timeout_s: float = 10.0) -> tuple[Handovers, _Channel, _Clock, list[EncodedRecord]]:
    channel, clock = _Channel(), _Clock()
    gaps_topic = _gap().topic
    h = Handovers(channel, "new", {3: [SubArg("trades-all", inst_id="BTC-USDT")]},  # type: ignore[arg-type]
                  timeout_s, gaps_topic, monotonic=clock)
    out: list[EncodedRecord] = []

    async def deliver(records: Sequence[EncodedRecord]) -> None:
        out.extend(records)

    h.deliver = deliver
    return h, channel, clock, out


async def test_without_released_in_time_the_new_owner_publishes_everything_it_held_with_the_gap() -> None:
    h, channel, clock, out = _service()
    assert await h.gained([3], 7, {3: "old"}) == {3: "old"}
    held = [_gap(), _trade(9), _trade(10)]
    assert [h.filter(3, r, owned=True) for r in held] == [False, False, False], "held, not published"
    await h.step()
    assert [type(m) for m in channel.sent] == [Prepared] and channel.sent[0].first == {STREAM: 9}  # type: ignore[union-attr]
    clock.now += 9.9
    await h.step()
    assert out == [] and h.holding == {3}
    clock.now += 0.2
    await h.step()
    assert out == held, "the fallback publishes all of it, in order, the gap (4 -> 9) included"
    assert h.stats.results["fallback"] == 1 and not h.holding
    taken = channel.sent[-1]
    assert isinstance(taken, Taken) and (taken.shard, taken.member, taken.generation) == (3, "new", 7), \
        "the old owner is told to stop holding on"
    assert h.filter(3, _trade(11), owned=True), "then the shard is simply owned"


async def test_a_released_record_publishes_only_past_the_cut_and_drops_the_hand_overs_gap() -> None:
    h, channel, _, out = _service()
    await h.gained([3], 7, {3: "old"})
    for r in (_gap(), _trade(9), _trade(10), _trade(11)):
        h.filter(3, r, owned=True)
    await h.step()
    channel.messages.put_nowait(Released(3, "old", "new", 6, {STREAM: 10}, 0))  # an older generation: ignored
    channel.messages.put_nowait(Released(3, "other", "new", 7, {STREAM: 10}, 0))  # not the predecessor: ignored
    await h.step()
    assert out == [] and h.holding == {3}
    channel.messages.put_nowait(Released(3, "old", "new", 7, {STREAM: 10}, 0))
    await h.step()
    assert out == [_trade(11)] and h.stats.results["completed"] == 1


async def test_the_old_owner_publishes_up_to_the_new_owners_first_record_then_writes_released() -> None:
    h, channel, _, _ = _service()
    h.member = "old"
    ended: list[int] = []
    h.on_released = ended.append
    h.lost([3], 6, {3: {STREAM: 5}})
    assert h.filter(3, _trade(6), owned=False)
    channel.messages.put_nowait(Prepared(3, "new", 7, "old", {STREAM: 8}, 0))
    await h.step()
    assert h.filter(3, _trade(7), owned=False) and h.filter(3, _trade(8), owned=False), "up to the cut"
    assert not h.filter(3, _trade(9), owned=False), "the new owner publishes from here"
    await h.step()
    assert channel.sent == [Released(3, "old", "new", 7, {STREAM: 8}, channel.sent[0].ts_ns)]
    assert ended == [3] and h.stats.results["released"] == 1


async def test_the_old_owner_keeps_publishing_until_prepared_even_past_one_timeout_and_stops_on_taken() -> None:
    h, channel, clock, _ = _service()
    h.member = "old"
    ended: list[int] = []
    h.on_released = ended.append
    h.lost([3], 6, {3: {STREAM: 5}})
    clock.now += 15.0  # the new owner is still connecting
    await h.step()
    assert h.releasing == {3} and h.filter(3, _trade(6), owned=False), "not cut before the new owner has it"
    channel.messages.put_nowait(Taken(3, "new", 7, 0))  # the new owner gave up waiting and took it over
    await h.step()
    assert ended == [3] and h.stats.results["release_preempted"] == 1
    assert not h.filter(3, _trade(7), owned=False), "then the new owner alone publishes it"


async def test_the_old_owner_without_any_new_owner_gives_up_after_twice_the_timeout() -> None:
    h, _, clock, _ = _service()
    h.member = "old"
    h.lost([3], 6, {3: {STREAM: 5}})
    clock.now += 19.9
    await h.step()
    assert h.releasing == {3}
    clock.now += 0.2
    await h.step()
    assert not h.releasing and h.stats.results["release_timeout"] == 1


async def test_the_last_member_stopping_with_every_shard_hands_nothing_over() -> None:
    h, channel, _, _ = _service()
    h.member = "old"
    await h.leave([3], 6, {3: {STREAM: 5}}, everything=True)
    assert not h.releasing and channel.sent == [], "nobody to hand to: no release to wait for"
    await h.leave([3], 6, {3: {STREAM: 5}})
    assert h.releasing == {3} and [type(m) for m in channel.sent] == [Leaving]


async def test_a_prepared_read_before_the_old_owner_learns_its_loss_still_counts() -> None:
    """Members learn a new assignment at different moments: the new owner's `prepared` can come first."""
    h, channel, _, _ = _service()
    h.member = "old"
    channel.messages.put_nowait(Prepared(3, "new", 7, "old", {STREAM: 8}, 0))
    await h.step()
    h.lost([3], 6, {3: {STREAM: 5}})
    assert h.filter(3, _trade(7), owned=False) and h.filter(3, _trade(8), owned=False), "up to the cut"
    assert not h.filter(3, _trade(9), owned=False), "the new owner publishes from here"
    await h.step()
    assert [type(m) for m in channel.sent] == [Released] and h.stats.results["released"] == 1


async def test_a_taken_read_before_the_old_owner_learns_its_loss_means_no_release() -> None:
    h, channel, _, _ = _service()
    h.member = "old"
    channel.messages.put_nowait(Taken(3, "new", 5, 0))  # a stale one: an older generation than this loss
    channel.messages.put_nowait(Taken(3, "new", 7, 0))
    await h.step()
    h.lost([3], 6, {3: {STREAM: 5}})
    assert not h.releasing and h.stats.results["release_preempted"] == 1
    assert not h.filter(3, _trade(6), owned=False), "nothing of it published here any more"
