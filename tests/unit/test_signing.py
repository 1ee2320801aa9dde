"""OKX signatures: the vectors below were computed independently with `openssl dgst -sha256 -hmac`."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ingest.okx import signing

SECRET = "not-a-real-secret"


def test_ws_login_signature_matches_independent_hmac() -> None:
    assert signing.ws_login_sign(SECRET, "1538054050") == "T8lWo6kZU52w/J9A/GacYlQvmj02zO93n50Yvaoox/A="


def test_rest_get_signature_covers_the_query_string() -> None:
    ts = "2020-12-08T09:08:57.715Z"
    assert (signing.rest_sign(SECRET, ts, "get", "/api/v5/account/balance?ccy=BTC")
            == "fnQzZHLEQSVSMeL/LPy80E6EtiYj4T7guP2vzofm4aY=")
    assert signing.rest_sign(SECRET, ts, "GET", "/api/v5/account/balance") != signing.rest_sign(
        SECRET, ts, "GET", "/api/v5/account/balance?ccy=BTC")


def test_rest_post_signature_covers_the_body() -> None:
    ts = "2020-12-08T09:08:57.715Z"
    assert (signing.rest_sign(SECRET, ts, "POST", "/api/v5/trade/order", '{"instId":"BTC-USDT"}')
            == "FKafkDcJZ6Ix8rNW8G12L/cAjSqDlynUYDa5Ti3pxrM=")


def test_login_timestamp_is_whole_unix_seconds() -> None:
    assert signing.ws_login_timestamp(1_704_876_947_999) == "1704876947"


def test_rest_timestamp_has_okx_form() -> None:
    assert signing.rest_timestamp(1_607_418_537_715) == "2020-12-08T09:08:57.715Z"
    assert signing.rest_timestamp(1_607_418_537_005) == "2020-12-08T09:08:57.005Z"


@given(st.integers(min_value=0, max_value=4_102_444_800_000))
def test_rest_timestamp_round_trips(epoch_ms: int) -> None:
    ts = signing.rest_timestamp(epoch_ms)
    assert len(ts) == 24
    assert signing.parse_rest_timestamp(ts) == epoch_ms


def test_malformed_rest_timestamps_are_rejected() -> None:
    for bad in ("1607418537715", "2020-12-08T09:08:57Z", "2020-12-08 09:08:57.715Z", ""):
        try:
            signing.parse_rest_timestamp(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")
