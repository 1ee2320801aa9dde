"""OKX's repeated-order-push rules (SPEC 6) and the backfill's bounded seen-set."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.core.orders import BoundedSeen, OrderPush, OrderPushDedupe, OrderRule, SeenSet

MIN = 60_000


def push_from_frame(d: dict[str, str]) -> OrderPush:
    return OrderPush(
        inst_id=d["instId"], ord_id=d["ordId"], state=d["state"], u_time=int(d["uTime"]), trade_id=d["tradeId"],
        acc_fill_sz=d["accFillSz"], px=d["px"], sz=d["sz"], req_id=d["reqId"], amend_result=d["amendResult"],
        code=d["code"],
    )


def live() -> OrderPush:
    return OrderPush("ETH-USDT", "370257534141235201", "live", 1634548275191, px="60000", sz="0.007526",
                     acc_fill_sz="0")


def fill(trade_id: str, acc: str, state: str = "partially_filled") -> OrderPush:
    return replace(live(), state=state, trade_id=trade_id, acc_fill_sz=acc)


def test_real_live_push_repeated_with_another_u_time_is_kept_once(shared_okx: Path) -> None:
    frame = json.loads((shared_okx / "frames" / "orders.jsonl").read_text().splitlines()[0])
    push = push_from_frame(frame["data"][0])
    dedupe = OrderPushDedupe()
    assert dedupe.accept(push, 0).keep
    repeat = dedupe.accept(replace(push, u_time=push.u_time + 7), 1)
    assert (repeat.keep, repeat.rule) == (False, OrderRule.STATE_CHANGE)


def test_each_fill_is_kept_once_per_inst_id_and_trade_id() -> None:
    dedupe = OrderPushDedupe()
    assert dedupe.accept(fill("101", "0.002"), 0).keep
    again = dedupe.accept(replace(fill("101", "0.002"), u_time=99), 1)
    assert (again.keep, again.rule) == (False, OrderRule.FILL)
    assert dedupe.accept(fill("102", "0.004"), 2).keep
    # Trade ids are unique per instrument only: the same id on another instrument is another fill.
    assert dedupe.accept(replace(fill("101", "0.002"), inst_id="BTC-USDT", ord_id="9"), 3).keep


def test_last_fill_with_state_filled_is_a_fill_not_the_market_completion() -> None:
    dedupe = OrderPushDedupe()
    assert dedupe.accept(fill("103", "0.007526", state="filled"), 0).rule is OrderRule.FILL
    completion = replace(live(), state="filled", acc_fill_sz="0.007526")
    assert dedupe.accept(completion, 1).keep
    assert not dedupe.accept(replace(completion, u_time=5), 2).keep


def test_filled_without_trade_id_is_processed_once_per_order_even_with_fill_size_zero() -> None:
    dedupe = OrderPushDedupe()
    done = replace(live(), state="filled", acc_fill_sz="0")  # SPEC: a market order may show filled, fillSz "0"
    first = dedupe.accept(done, 0)
    assert (first.keep, first.rule) == (True, OrderRule.FILLED_NO_TRADE)
    assert not dedupe.accept(replace(done, acc_fill_sz="0.007526", u_time=1), 1).keep


def test_cancel_is_terminal_and_processed_once_per_order() -> None:
    dedupe = OrderPushDedupe()
    for state in ("canceled", "mmp_canceled"):
        order = replace(live(), ord_id=state, state=state)
        assert [(v.keep, v.rule) for v in (dedupe.accept(order, 0), dedupe.accept(order, 1))] == [
            (True, OrderRule.CANCELED), (False, OrderRule.CANCELED)]
    dedupe = OrderPushDedupe()
    canceled = replace(live(), state="canceled")
    assert dedupe.accept(canceled, 0).keep
    later = dedupe.accept(replace(canceled, state="mmp_canceled", u_time=2), 1)
    assert (later.keep, later.rule) == (False, OrderRule.CANCELED)


def test_amend_response_is_processed_once_per_req_id() -> None:
    dedupe = OrderPushDedupe()
    amended = replace(live(), px="61000", req_id="r1", amend_result="0")
    assert dedupe.accept(amended, 0).keep
    repeat = dedupe.accept(replace(amended, u_time=5), 1)
    assert (repeat.keep, repeat.rule) == (False, OrderRule.AMEND)
    assert dedupe.accept(replace(amended, px="62000", req_id="r2"), 2).keep
    # A client may reuse a reqId on another order: that is not a repeat.
    assert dedupe.accept(replace(amended, ord_id="other"), 3).keep


def test_push_echoing_an_old_req_id_without_amend_result_is_judged_as_a_state_change() -> None:
    dedupe = OrderPushDedupe()
    dedupe.accept(replace(live(), req_id="r1", amend_result="0"), 0)
    echo = dedupe.accept(replace(live(), req_id="r1", state="partially_filled", acc_fill_sz="0.001"), 1)
    assert (echo.keep, echo.rule) == (True, OrderRule.STATE_CHANGE)


def test_a_change_of_price_size_or_filled_amount_is_never_a_repeat() -> None:
    dedupe = OrderPushDedupe()
    assert dedupe.accept(live(), 0).keep
    assert dedupe.accept(replace(live(), px="60001"), 1).keep
    assert dedupe.accept(replace(live(), sz="0.1"), 2).keep
    assert dedupe.accept(replace(live(), state="partially_filled", acc_fill_sz="0.001"), 3).keep
    assert dedupe.accept(replace(live(), detail=("tp:70000",)), 4).keep
    assert not dedupe.accept(replace(live(), detail=("tp:70000",), u_time=9), 5).keep


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 2)), min_size=1, max_size=40), st.data())
def test_any_interleaving_of_repeats_keeps_exactly_the_first_of_each_distinct_push(
    script: list[tuple[int, int]], data: st.DataObject
) -> None:
    """Pushes of one order, each possibly repeated with another uTime: kept == distinct pushes, in first order."""
    states = [
        replace(live(), state="partially_filled", trade_id="1", acc_fill_sz="0.001"),
        replace(live(), state="partially_filled", trade_id="2", acc_fill_sz="0.002"),
        replace(live(), px="61000", req_id="a", amend_result="0"),
        replace(live(), state="canceled", acc_fill_sz="0.002"),
        live(),
    ]
    dedupe = OrderPushDedupe()
    kept: list[int] = []
    for n, (which, jitter) in enumerate(script):
        push = replace(states[which], u_time=states[which].u_time + jitter)
        if dedupe.accept(push, n).keep:
            kept.append(which)
    first_seen = list(dict.fromkeys(which for which, _ in script))
    assert kept == first_seen


def test_terminal_orders_are_evicted_after_the_ttl_and_silent_orders_after_the_age_cap() -> None:
    dedupe = OrderPushDedupe(terminal_ttl_ms=10 * MIN, max_age_ms=60 * MIN)
    dedupe.accept(replace(live(), ord_id="done", state="canceled"), 0)
    dedupe.accept(replace(live(), ord_id="resting"), 0)
    dedupe.accept(replace(live(), ord_id="busy"), 0)
    dedupe.prune(10 * MIN)
    assert set(dedupe.orders()) == {"done", "resting", "busy"}
    dedupe.accept(replace(live(), ord_id="busy", state="partially_filled", acc_fill_sz="1"), 30 * MIN)
    assert set(dedupe.orders()) == {"resting", "busy"}
    assert dedupe.accept(replace(live(), ord_id="done", state="canceled"), 30 * MIN).keep  # forgotten by design
    dedupe.prune(61 * MIN)
    assert set(dedupe.orders()) == {"busy"}


def test_memory_is_bounded_by_the_order_cap() -> None:
    dedupe = OrderPushDedupe(max_orders=100)
    for i in range(1000):
        dedupe.accept(replace(live(), ord_id=str(i)), i)
    assert len(dedupe) == 100
    assert next(iter(dedupe.orders())) == "900"


def test_bounded_seen_forgets_by_age_from_the_first_sighting_and_by_count() -> None:
    seen: BoundedSeen[str] = BoundedSeen(max_size=2, max_age_ms=100)
    assert seen.first_time("a", 0)
    assert not seen.first_time("a", 90)  # a repeat does not extend the life of "a"
    assert seen.first_time("a", 101)
    assert seen.first_time("b", 102) and seen.first_time("c", 103)
    assert "a" not in seen and len(seen) == 2


def test_backfill_seen_set_skips_records_already_published_per_stream() -> None:
    seen: SeenSet[str, object] = SeenSet(max_per_stream=1000, max_age_ms=3600_000)
    assert seen.first_time("trades:BTC-USDT", 2832749635, 0)
    assert not seen.first_time("trades:BTC-USDT", 2832749635, 10)
    assert seen.first_time("trades:ETH-USDT", 2832749635, 10)
    assert seen.first_time("orders", ("370257534141235201", "live"), 10)
    assert not seen.first_time("orders", ("370257534141235201", "live"), 11)
    assert seen.first_time("orders", ("370257534141235201", "canceled"), 12)
    assert seen.first_time("fills", "bill-1", 13) and seen.seen("fills", "bill-1")
    assert len(seen) == 5


def test_backfill_seen_set_bounds_the_number_of_streams() -> None:
    seen: SeenSet[int, int] = SeenSet(max_per_stream=10, max_age_ms=1000, max_streams=3)
    for stream in range(5):
        seen.first_time(stream, 1, 0)
    assert not seen.seen(0, 1) and seen.seen(4, 1)
