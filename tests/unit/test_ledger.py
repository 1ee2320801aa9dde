"""The private ledger decides which REST rows of an account are news to the record (core/ledger.py)."""

from __future__ import annotations

from ingest.core.ledger import PrivateLedger, order_state, reports_fill
from ingest.core.normalize import order_from_rest
from ingest.core.records import Order


def order(ord_id: str = "1", state: str = "live", acc: str = "0", *, u_time: int = 1_000, c_time: int = 900,
          px: str = "100", sz: str = "2", trade_id: str = "", fill_sz: str = "0", amend: str = "") -> Order:
    row = {"instId": "BTC-USDT", "instType": "SPOT", "ordId": ord_id, "state": state, "accFillSz": acc, "px": px,
           "sz": sz, "uTime": str(u_time), "cTime": str(c_time), "tradeId": trade_id, "fillSz": fill_sz,
           "amendResult": amend}
    rec = order_from_rest(row, recv_ts_ns=1)
    assert isinstance(rec, Order)
    return rec


def test_a_rest_row_is_news_only_when_it_shows_a_state_the_record_lacks() -> None:
    ledger = PrivateLedger()
    ledger.push_published(order(state="live"), 1_000)
    assert not ledger.rest_order_is_news(order(state="live", u_time=1_000), 2_000)
    assert ledger.rest_order_is_news(order(state="partially_filled", acc="1", u_time=1_500), 2_000)
    assert not ledger.rest_order_is_news(order(state="partially_filled", acc="1", u_time=1_500), 2_100)
    assert ledger.rest_order_is_news(order("2", state="canceled", u_time=1_700), 2_000), "an order never seen"


def test_decimals_compare_by_value_not_by_spelling() -> None:
    assert order_state(order(acc="0.010", px="100.0")) == order_state(order(acc="0.01", px="100"))


def test_a_stale_rest_row_never_overrides_a_newer_or_final_state() -> None:
    ledger = PrivateLedger()
    ledger.push_published(order(state="filled", acc="2", u_time=2_000, trade_id="7", fill_sz="2"), 2_000)
    # Read before the fill was pushed, handled after it: older, and open while the record shows it final.
    assert not ledger.rest_order_is_news(order(state="live", u_time=1_000), 3_000)
    assert not ledger.rest_order_is_news(order(state="live", u_time=2_500), 3_000)
    assert ledger.last_state("1") == ("filled", "2", "100", "2")


def test_a_push_repeating_a_state_rest_published_is_a_repeat_but_an_amend_response_is_not() -> None:
    ledger = PrivateLedger()
    assert ledger.rest_order_is_news(order(state="partially_filled", acc="1", u_time=1_500), 2_000)
    late_push = order(state="partially_filled", acc="1", u_time=1_500, trade_id="5", fill_sz="1")
    assert ledger.repeats_rest(late_push)
    assert not ledger.repeats_rest(order(state="partially_filled", acc="1", amend="0"))
    assert not ledger.repeats_rest(order(state="filled", acc="2", trade_id="6", fill_sz="1"))


def test_only_an_update_with_a_fill_size_reports_a_fill() -> None:
    assert reports_fill(order(state="partially_filled", acc="1", trade_id="5", fill_sz="1"))
    # OKX may keep the last tradeId on a later update: a cancel after a partial fill reports no fill.
    assert not reports_fill(order(state="canceled", acc="1", trade_id="5", fill_sz="0"))
    assert not reports_fill(order(state="filled", acc="2", trade_id="", fill_sz="0"))


def test_fills_pushed_on_the_orders_channel_are_remembered_by_instrument_and_trade() -> None:
    ledger = PrivateLedger()
    ledger.push_published(order(state="partially_filled", acc="1", trade_id="5", fill_sz="1"), 1_000)
    ledger.push_published(order(state="canceled", acc="1", trade_id="5", fill_sz="0", u_time=1_100), 1_100)
    assert ledger.trade_recorded("BTC-USDT", "5")
    assert not ledger.trade_recorded("BTC-USDT", "6") and not ledger.trade_recorded("ETH-USDT", "5")


def test_open_since_is_the_creation_of_the_oldest_order_recorded_open() -> None:
    ledger = PrivateLedger()
    assert ledger.open_since_ms() is None
    ledger.push_published(order("1", c_time=500), 1_000)
    ledger.push_published(order("2", c_time=300), 1_000)
    ledger.push_published(order("3", c_time=100, state="filled", acc="2"), 1_000)
    assert ledger.open_since_ms() == 300
    ledger.push_published(order("2", c_time=300, state="canceled", u_time=1_200), 1_200)
    assert ledger.open_since_ms() == 500


def test_memory_is_bounded_by_count_and_by_age() -> None:
    ledger = PrivateLedger(max_orders=2, max_age_ms=10_000)
    for i in range(3):
        ledger.push_published(order(str(i)), 1_000)
    assert len(ledger) == 2 and ledger.last_state("0") is None
    ledger.push_published(order("9"), 20_000)  # the others were last changed more than max_age_ms ago
    assert len(ledger) == 1
