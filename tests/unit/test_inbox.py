"""The inbox: never refuses an item, pauses producers at its limit and resumes them at half."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from ingest.core.events import Inbound, LinkEvent, LinkEventKind
from ingest.io.inbox import Inbox, oldest


def item(n: int) -> LinkEvent:
    return LinkEvent(kind=LinkEventKind.SUBSCRIBED, conn=f"c{n}", name="public-0", ts_ns=n, args=())


def conn_of(got: Inbound) -> str:
    assert isinstance(got, LinkEvent)
    return got.conn


async def test_items_past_the_limit_are_kept_in_order_and_paused_producers_resume_at_half() -> None:
    inbox = Inbox(limit=4)
    resumed: list[str] = []
    for n in range(6):
        inbox.put_nowait(item(n))  # never raises: the limit is enforced by pausing, not by refusing
    assert inbox.over()
    inbox.pause_until_room("socket-a", lambda: resumed.append("a"))
    inbox.pause_until_room("socket-b", lambda: resumed.append("b"))
    inbox.pause_until_room("socket-a", lambda: resumed.append("a2"))  # one pending resume per producer
    got = [conn_of(inbox.get_nowait()) for _ in range(3)]
    assert resumed == []  # 3 left: above half of the limit
    got.append(conn_of(await inbox.get()))
    assert resumed == ["a2", "b"]  # down to 2 = half: each paused producer resumed once
    got += [conn_of(inbox.get_nowait()) for _ in range(2)]
    assert got == [f"c{n}" for n in range(6)]
    assert resumed == ["a2", "b"] and inbox.pauses == 2


async def test_a_forgotten_producer_is_not_resumed() -> None:
    inbox = Inbox(limit=2)
    resumed: list[str] = []
    inbox.put_nowait(item(1))
    inbox.put_nowait(item(2))
    inbox.pause_until_room("gone", lambda: resumed.append("gone"))
    inbox.forget("gone")
    inbox.get_nowait()
    assert resumed == []


async def test_room_waits_until_the_consumer_has_caught_up() -> None:
    inbox = Inbox(limit=2)
    inbox.put_nowait(item(1))
    inbox.put_nowait(item(2))
    waiter = asyncio.create_task(inbox.room())
    for _ in range(5):  # let every ready task run: the waiter must still wait
        await asyncio.sleep(0)
    assert not waiter.done()
    inbox.get_nowait()
    await asyncio.wait_for(waiter, 5)
    await inbox.room()  # below the limit: returns at once


def test_a_limit_below_two_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        Inbox(limit=1)


async def test_put_waits_for_room_like_a_bounded_queue() -> None:
    inbox = Inbox(limit=2)
    await inbox.put(item(1))
    await inbox.put(item(2))
    putter = asyncio.create_task(inbox.put(item(3)))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not putter.done() and inbox.qsize() == 2
    inbox.get_nowait()
    await asyncio.wait_for(putter, 5)
    assert [conn_of(inbox.get_nowait()) for _ in range(2)] == ["c2", "c3"]


async def test_a_failing_resume_costs_neither_the_item_nor_the_other_resumes() -> None:
    inbox = Inbox(limit=2)
    resumed: list[str] = []
    inbox.put_nowait(item(1))
    inbox.put_nowait(item(2))

    def broken() -> None:
        raise RuntimeError("transport gone")

    inbox.pause_until_room("broken", broken)
    inbox.pause_until_room("fine", lambda: resumed.append("fine"))
    assert conn_of(inbox.get_nowait()) == "c1"
    assert resumed == ["fine"]


@pytest.mark.parametrize("make", [lambda: Inbox(limit=2), asyncio.Queue], ids=["inbox", "plain-queue"])
async def test_oldest_peeks_at_the_next_item_without_taking_it(make: Callable[[], asyncio.Queue[Inbound]]) -> None:
    """The pipeline's lag reads the queue's head this way; it relies on asyncio.Queue's internal deque."""
    queue = make()
    assert oldest(queue) is None
    for n in range(3):
        queue.put_nowait(item(n))
    head = oldest(queue)
    assert head is not None and conn_of(head) == "c0" and queue.qsize() == 3
    assert conn_of(queue.get_nowait()) == "c0"
    head = oldest(queue)
    assert head is not None and conn_of(head) == "c1"
