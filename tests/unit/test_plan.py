"""Subscription planning: every arg lands on exactly one connection of the right endpoint, within OKX's limits."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.core.plan import (
    MAX_REQUEST_ID_LEN,
    PlanError,
    PlanLimits,
    batch_args,
    conflicts,
    encode_request,
    plan_connections,
)
from ingest.errors import IngestError
from ingest.okx.channels import Endpoint, SubArg, is_depth

INSTS = [f"{c}-USDT" for c in ("BTC", "ETH", "SOL", "XRP", "DOGE", "ADA", "TRX", "LTC")] + [
    f"{c}-USDT-SWAP" for c in ("BTC", "ETH", "SOL", "XRP")
]
INST_CHANNELS = ["trades", "tickers", "books", "books5", "bbo-tbt", "books-l2-tbt", "books50-l2-tbt", "trades-all",
                 "candle1m", "candle1H", "mark-price", "funding-rate", "open-interest"]
PRIVATE = [SubArg("orders", inst_type="ANY"), SubArg("account"), SubArg("positions", inst_type="ANY"),
           SubArg("balance_and_position"), SubArg("orders-algo", inst_type="ANY"), SubArg("fills")]

args_strategy = st.lists(
    st.one_of(
        st.builds(SubArg, st.sampled_from(INST_CHANNELS), inst_id=st.sampled_from(INSTS)),
        st.sampled_from(PRIVATE),
    ),
    max_size=300,
)
limits_strategy = st.builds(
    PlanLimits,
    args_per_connection=st.integers(1, 120),
    depth_per_connection=st.integers(1, 29),
    max_request_bytes=st.integers(200, 65_536),
)


def test_each_channel_goes_to_its_endpoint_and_login_only_where_needed() -> None:
    args = [SubArg("trades", inst_id="BTC-USDT"), SubArg("candle1m", inst_id="BTC-USDT"),
            SubArg("trades-all", inst_id="BTC-USDT"), SubArg("books-l2-tbt", inst_id="BTC-USDT"),
            SubArg("orders", inst_type="ANY"), SubArg("orders-algo", inst_type="ANY")]
    plan = {c.name: c for c in plan_connections(args, PlanLimits())}
    assert set(plan) == {"public-0", "business-0", "public-login-0", "private-0", "business-login-0"}
    assert plan["public-0"].args == (args[0],) and not plan["public-0"].login
    assert plan["business-0"].args == (args[1], args[2]) and not plan["business-0"].login
    assert plan["public-login-0"].endpoint is Endpoint.PUBLIC and plan["public-login-0"].login
    assert plan["private-0"].login and plan["business-login-0"].login


def test_depth_channels_are_spread_below_thirty_per_connection() -> None:
    args = [SubArg("books", inst_id=f"I{i}-USDT") for i in range(70)] + [SubArg("trades", inst_id="BTC-USDT")]
    plan = plan_connections(args, PlanLimits(depth_per_connection=29))
    assert [c.depth_count for c in plan] == [29, 29, 12]
    assert SubArg("trades", inst_id="BTC-USDT") in plan[0].args


def test_l2tbt_never_shares_a_connection_with_books50_of_the_same_instrument() -> None:
    args = [SubArg("books-l2-tbt", inst_id="BTC-USDT"), SubArg("books50-l2-tbt", inst_id="BTC-USDT"),
            SubArg("books50-l2-tbt", inst_id="ETH-USDT")]
    plan = plan_connections(args, PlanLimits())
    assert [c.args for c in plan] == [(args[0], args[2]), (args[1],)]


def test_duplicate_subscriptions_are_planned_once() -> None:
    a = SubArg("trades", inst_id="BTC-USDT")
    assert plan_connections([a, a, a], PlanLimits())[0].args == (a,)


def test_a_channel_no_endpoint_serves_is_refused_with_its_name() -> None:
    with pytest.raises(PlanError, match="tradez"):
        plan_connections([SubArg("tradez", inst_id="BTC-USDT")], PlanLimits())


def test_a_plan_failure_is_an_ingest_error_so_the_command_line_reports_it_with_exit_2() -> None:
    # The CLI turns every IngestError into "okx-ingest: <message>" and exit code 2; a ValueError would
    # escape it as a traceback.
    with pytest.raises(IngestError, match="exceeds 80 bytes per request"):
        plan_connections([SubArg("trades", inst_id="BTC-USDT-" + "X" * 60)], PlanLimits(max_request_bytes=80))


@settings(max_examples=200, deadline=None)
@given(args_strategy, limits_strategy)
def test_plan_places_every_arg_exactly_once_within_every_limit(args: list[SubArg], limits: PlanLimits) -> None:
    plan = plan_connections(args, limits)
    placed = [a for c in plan for a in c.args]
    assert sorted(placed) == sorted(set(args))
    names = [c.name for c in plan]
    assert len(names) == len(set(names))
    for conn in plan:
        assert 0 < len(conn.args) <= limits.args_per_connection
        assert conn.depth_count <= limits.depth_per_connection
        assert all(a.endpoint is conn.endpoint for a in conn.args)
        assert conn.login == (conn.endpoint is Endpoint.PRIVATE or any(a.needs_login for a in conn.args))
        assert not any(conflicts(a, b) for a in conn.args for b in conn.args)


@settings(max_examples=200, deadline=None)
@given(args_strategy, st.integers(300, 65_536), st.sampled_from(["subscribe", "unsubscribe"]))
def test_batches_keep_order_and_every_request_stays_under_the_size_limit(
    args: list[SubArg], max_bytes: int, op: str
) -> None:
    batches = batch_args(op, args, max_bytes)
    assert [a for b in batches for a in b] == args
    for batch in batches:
        assert batch
        assert len(encode_request(op, batch, "9" * MAX_REQUEST_ID_LEN)) < max_bytes


def test_many_args_fill_few_requests_to_save_the_hourly_budget() -> None:
    args = [SubArg("trades", inst_id=f"COIN{i}-USDT-SWAP") for i in range(2000)]
    batches = batch_args("subscribe", args, 60_000)
    assert len(batches) == 2
    body = orjson.loads(encode_request("subscribe", batches[0], "s1"))
    assert body["op"] == "subscribe" and body["id"] == "s1"
    assert body["args"][0] == {"channel": "trades", "instId": "COIN0-USDT-SWAP"}


def test_depth_count_counts_incremental_books_only() -> None:
    assert is_depth("books") and is_depth("books-l2-tbt") and not is_depth("books5")
