"""The private reconciler's REST reads against the simulator: every page, only the rows the hole changed,
retries of transient failures, and a refused read reported instead of retried forever."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable

from ingest.core.clock import ServerClock
from ingest.core.events import Inbound, ReconcileRequest, RestRecords
from ingest.core.records import Balance, Fill, Order, Position
from ingest.credentials import CredentialStore
from ingest.io.rest import LimiterRegistry, OkxRestClient
from ingest.okx.channels import SubArg
from ingest.services.private import ORDERS_PENDING_PATH, PrivateReconciler
from ingest.sim import SimConfig, SimServer

ORDERS = SubArg("orders", inst_type="ANY")
POSITIONS = SubArg("positions", inst_type="ANY")
ACCOUNT = SubArg("account")


def _sim_config() -> SimConfig:
    return SimConfig(instruments=("BTC-USDT", "BTC-USDT-SWAP"), api_key=secrets.token_hex(16),
                     api_secret=secrets.token_hex(32), passphrase=secrets.token_hex(8))


def _client(sim: SimServer, clock: ServerClock) -> OkxRestClient:
    cfg = sim.config
    store = CredentialStore({"OKX_API_KEY": cfg.api_key, "OKX_API_SECRET": cfg.api_secret,
                             "OKX_API_PASSPHRASE": cfg.passphrase})
    return OkxRestClient(clock=clock, credentials=store, base_url=sim.rest_base, registry=LimiterRegistry(),
                         max_attempts=1, retry_initial_s=0.01, retry_max_s=0.02)


def _request(seq: int, since_ns: int, *args: SubArg) -> ReconcileRequest:
    return ReconcileRequest(seq=seq, reason="test", since_ns=since_ns, args=frozenset(args))


async def test_a_read_walks_every_page_and_keeps_only_rows_changed_since_the_hole() -> None:
    clock = ServerClock(lambda: time.time_ns() // 1_000_000)
    async with SimServer(_sim_config()) as sim, _client(sim, clock) as rest:
        acct = sim.account
        done_before = [await acct.place_order("BTC-USDT", "buy", "0.01", "50000") for _ in range(3)]
        for o in done_before:
            await acct.fill(o)
        since_ns = (max(o.u_time for o in acct.orders.values()) + 1) * 1_000_000
        open_orders = [await acct.place_order("BTC-USDT", "buy", "0.01", "40000") for _ in range(5)]
        done_after = [await acct.place_order("BTC-USDT-SWAP", "buy", "1", "60000") for _ in range(3)]
        for o in done_after:
            await acct.fill(o)
        reconciler = PrivateReconciler(rest, clock, asyncio.Queue(), margin_ms=0, page_limit=2)
        batch = await reconciler.read(_request(1, since_ns, ORDERS, POSITIONS, ACCOUNT))

    orders = [r for r in batch.records if isinstance(r, Order)]
    assert sorted(o.ord_id for o in orders) == sorted(open_orders + done_after), "older completions left out"
    assert [o.u_time for o in orders] == sorted(o.u_time for o in orders), "oldest change first"
    assert all(o.source.value == "rest" for o in orders)
    assert sim.stats.rest_requests[ORDERS_PENDING_PATH] == 3, "5 open orders in pages of 2"
    fills = [r for r in batch.records if isinstance(r, Fill)]
    assert sorted(f.ord_id for f in fills) == sorted(done_after)
    assert [p.inst_id for p in batch.records if isinstance(p, Position)] == ["BTC-USDT-SWAP"]
    assert {b.ccy for b in batch.records if isinstance(b, Balance)} >= {None, "USDT", "BTC"}
    assert (batch.seq, batch.covers) == (1, (ACCOUNT, ORDERS, POSITIONS))


async def test_transient_failures_are_retried_and_requests_arriving_meanwhile_are_merged() -> None:
    clock = ServerClock(lambda: time.time_ns() // 1_000_000)
    async with SimServer(_sim_config()) as sim, _client(sim, clock) as rest:
        order = await sim.account.place_order("BTC-USDT", "buy", "0.01", "40000")
        sim.faults.rest_error(count=2, path=ORDERS_PENDING_PATH, status=503)
        inbox: asyncio.Queue[Inbound] = asyncio.Queue()
        reconciler = PrivateReconciler(rest, clock, inbox, settle_s=0, retry_initial_s=0.01, retry_max_s=0.02)
        task = asyncio.create_task(reconciler.run())
        try:
            reconciler.request_reconcile(_request(1, time.time_ns(), ORDERS))
            reconciler.request_reconcile(_request(2, time.time_ns() - 10**9, ACCOUNT))
            batch = await asyncio.wait_for(inbox.get(), 10)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert isinstance(batch, RestRecords)
    assert batch.seq == 2 and set(batch.covers) == {ORDERS, ACCOUNT}
    assert [o.ord_id for o in batch.records if isinstance(o, Order)] == [order]
    assert reconciler.stats.failures >= 1 and reconciler.stats.reads == 1 and not reconciler.pending


async def test_a_read_okx_refuses_for_good_is_reported_not_retried() -> None:
    clock = ServerClock(lambda: time.time_ns() // 1_000_000)
    async with SimServer(_sim_config()) as sim, _client(sim, clock) as rest:
        sim.faults.rest_error(count=1, path=ORDERS_PENDING_PATH, status=200, code="50120",
                              msg="Your API key does not have permission")
        reconciler = PrivateReconciler(rest, clock, asyncio.Queue(), settle_s=0)
        task = asyncio.create_task(reconciler.run())
        try:
            reconciler.request_reconcile(_request(1, time.time_ns(), ORDERS))
            await sim.wait_rest(ORDERS_PENDING_PATH)
            await _until(lambda: reconciler.stats.failures == 1 and not reconciler.pending)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert sim.stats.rest_requests[ORDERS_PENDING_PATH] == 1
        assert reconciler.stats.last_error is not None and "50120" in reconciler.stats.last_error


async def _until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)  # polling the reconciler's own counters
