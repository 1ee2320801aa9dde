"""`make bench-picows` compares the recorder on picows with the recorder on websockets: that comparison holds only
if its picows adapter (bench/picows_link.py) hands the pipeline what the recorder's links do. Skipped where picows
is not installed: it is measured by the bench, never a dependency of the product."""

from __future__ import annotations

from collections.abc import Callable

import pytest

pytest.importorskip("picows")

from bench.picows_link import PicowsConnections
from ingest.config import OkxSettings, Subscription
from ingest.core.events import Inbound, InboundFrame, LinkEvent, LinkEventKind
from ingest.io.inbox import Inbox
from ingest.okx.channels import SubArg
from ingest.services.connections import ConnectionManager
from ingest.sim import SimServer

from ._ws_support import INST, Keys, Recorder, fast_ws, is_push, running

OTHER = "ETH-USDT"
ARGS = (SubArg("trades-all", inst_id=INST), SubArg("trades", inst_id=OTHER))


def _pushes(rec: Recorder) -> dict[str, list[bytes]]:
    """Each logical connection's pushes in the order the pipeline got them."""
    out: dict[str, list[bytes]] = {}
    for frame in rec.frames():
        if is_push(frame):
            out.setdefault(frame.name, []).append(frame.data)
    return out


def _has_pushes(n: int) -> Callable[[list[Inbound]], bool]:
    return lambda items: sum(1 for i in items if isinstance(i, InboundFrame) and is_push(i)) >= n


def _subscribed(items: list[Inbound]) -> bool:
    return sum(1 for i in items if isinstance(i, LinkEvent) and i.kind is LinkEventKind.SUBSCRIBED) == len(ARGS)


@pytest.mark.parametrize("compression", [True, False])
async def test_picows_adapter_hands_the_pipeline_the_same_pushes_and_events_as_the_websockets_links(
        compression: bool) -> None:
    async with SimServer(Keys().sim_config(connect_limit=100)) as sim:  # four connections at once
        okx = OkxSettings(ws_base_url=sim.ws_base, channels=[], subscriptions=[
            Subscription(channel=a.channel, inst_id=a.inst_id) for a in ARGS])
        ws = fast_ws(compression=compression)
        inbox = Inbox(10_000)
        on_ws, on_picows = Recorder(Inbox(10_000)), Recorder(inbox)
        picows = PicowsConnections(okx, ws, inbox)
        async with running(on_ws.run(), on_picows.run(), ConnectionManager(okx, ws, on_ws.queue).run(),
                           picows.run()):
            for rec in (on_ws, on_picows):
                await rec.wait_for(_subscribed)
            sent = await sim.pump_trades(INST, 40) + await sim.pump_trades(OTHER, 40)  # frames x 2 subscribers
            for rec in (on_ws, on_picows):
                await rec.wait_for(_has_pushes(sent // 2))
        for rec in (on_ws, on_picows):  # what the links put in while shutting down
            while not rec.queue.empty():
                rec.items.append(rec.queue.get_nowait())

        assert all(link.reader is not None and link.reader.inflater.enabled is compression for link in picows.links)
        assert _pushes(on_picows) == _pushes(on_ws)
        for rec in (on_ws, on_picows):  # every SUBSCRIBED balanced by a DISCONNECTED, on either side
            kinds = [(e.kind, e.args) for e in rec.events()]
            assert sorted(a for k, args in kinds if k is LinkEventKind.SUBSCRIBED for a in args) == sorted(ARGS)
            assert sorted(a for k, args in kinds if k is LinkEventKind.DISCONNECTED for a in args) == sorted(ARGS)
        for conn in {f.conn for f in on_picows.frames()}:
            frames = [f for f in on_picows.frames() if f.conn == conn]
            assert [f.recv_seq for f in frames] == list(range(1, len(frames) + 1))
            subscribed = next(i for i, item in enumerate(on_picows.items)
                              if isinstance(item, LinkEvent) and item.conn == conn)
            assert subscribed < on_picows.items.index(next(f for f in frames if is_push(f)))
