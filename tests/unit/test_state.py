"""A restarted recorder reports the time nobody recorded: stream state survives the process."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.core.events import LinkEvent, LinkEventKind
from ingest.core.gaps import GapKind, GapTracker, StreamCheckpoint
from ingest.core.streams import Position
from ingest.io.state import StreamStateFile
from ingest.okx.channels import SubArg

TRADES = SubArg("trades", "BTC-USDT")
BOOKS = SubArg("books", "ETH-USDT")

positions = st.builds(Position, st.none() | st.integers(0, 2**53), st.none() | st.integers(-(2**40), 2**53),
                      st.none() | st.integers(-1, 2**53))
checkpoints = st.builds(
    StreamCheckpoint, st.sampled_from([TRADES, BOOKS, SubArg("orders", inst_type="ANY")]), st.none() | positions,
    st.none() | st.text(max_size=20), st.none() | st.sampled_from(["SPOT", "SWAP"]),
    st.none() | st.sampled_from(list(GapKind)), st.none() | positions, st.none() | st.text(max_size=20),
    st.none() | st.integers(0, 2**62), st.text(max_size=40))


@settings(deadline=None)  # each example fsyncs a file: on a busy disk that alone can pass hypothesis' 200 ms
@given(cps=st.lists(checkpoints, max_size=5), saved=st.integers(0, 2**62), private=st.none() | st.integers(0, 2**62))
def test_state_file_round_trips_every_checkpoint(cps: list[StreamCheckpoint], saved: int, private: int | None,
                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    f = StreamStateFile(tmp_path_factory.mktemp("s") / "0.streams.json")
    f.save(saved, cps, private)
    state = f.load()
    assert state is not None
    assert state.saved_ts_ns == saved and state.private_last_ns == private
    # Open-gap details are kept exactly when there is an open gap (they mean nothing otherwise).
    expected = [c if c.open_kind is not None else StreamCheckpoint(c.arg, c.last, c.last_conn, c.inst_type)
                for c in cps]
    assert list(state.streams) == expected


def test_missing_file_is_a_first_start_and_a_corrupt_one_is_logged_not_fatal(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = StreamStateFile(tmp_path / "0.streams.json")
    assert f.load() is None
    f.path.write_bytes(b'{"version": 1, "saved_ts_ns": 1, "streams": [{"arg": {}}]}')
    with caplog.at_level(logging.ERROR):
        assert f.load() is None
    assert "stream_state_unreadable" in caplog.text


def test_planned_stop_gap_is_closed_by_the_next_process_with_the_same_id() -> None:
    before = GapTracker()
    before.on_link_event(LinkEvent(LinkEventKind.SUBSCRIBED, "c#1", "c", 1, (TRADES,)))
    before.on_record(TRADES, "c#1", Position(1_000, 41, None), 2)
    before.on_link_event(LinkEvent(LinkEventKind.DISCONNECTED, "c#1", "c", 3, (TRADES,), reason="shutdown"))
    [cp] = before.checkpoint()
    expected_id = before.open_gaps(4)[0].gap_id

    after = GapTracker()
    after.restore(StreamCheckpoint.from_json(cp.to_json()), 5, "the recorder was not running")
    [gap] = after.on_record(TRADES, "c#9", Position(9_000, 57, None), 10)
    assert gap.gap_id == expected_id and gap.kind is GapKind.DISCONNECT
    assert gap.before == Position(1_000, 41, None) and gap.after is not None and gap.after.trade_id == 57


def test_unclean_stop_opens_a_gap_from_the_last_saved_position() -> None:
    before = GapTracker()
    before.on_record(BOOKS, "c#1", Position(1_000, None, 77), 2, snapshot=True)
    [cp] = before.checkpoint()  # saved while running: no open gap (then the process was killed)
    after = GapTracker()
    after.restore(cp, 3, "the recorder was not running")
    assert after.on_record(BOOKS, "c#2", Position(2_000, None, 80), 4) == []  # an update cannot close it
    [gap] = after.on_record(BOOKS, "c#2", Position(3_000, None, 90), 5, snapshot=True)
    assert gap.kind is GapKind.DISCONNECT and gap.before == Position(1_000, None, 77)
    assert gap.reason == "the recorder was not running"
