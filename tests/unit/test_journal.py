"""The journal replays exactly the unacknowledged suffix, in order, whatever happened before the restart."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ingest.io.journal import (
    SEGMENT_HEADER_BYTES,
    Interval,
    Journal,
    JournalEntry,
    JournalError,
    JournalFullError,
)
from ingest.io.sink import EncodedRecord

records = st.builds(
    EncodedRecord,
    topic=st.sampled_from(["okx.trades", "okx.books"]),
    key=st.one_of(st.none(), st.binary(min_size=1, max_size=12)),
    value=st.binary(max_size=200),
    headers=st.tuples(st.tuples(st.just("record_id"), st.binary(max_size=10))),
    ts_ms=st.one_of(st.none(), st.integers(0, 2**62)),
)
batches = st.lists(records, min_size=1, max_size=6)


def record(i: int, size: int = 50) -> EncodedRecord:
    return EncodedRecord("okx.trades", f"k{i % 3}".encode(), i.to_bytes(4, "big") * (size // 4),
                         (("record_id", str(i).encode()),), i)


def opened(directory: Path, *, segment_bytes: int = 64 * 1024**2, max_bytes: int = 2 * 1024**3,
           cache_bytes: int = 32 * 1024**2) -> Journal:
    journal = Journal(directory, fsync="never", segment_bytes=segment_bytes, max_bytes=max_bytes,
                      cache_bytes=cache_bytes)
    journal.open()
    return journal


def read_all(journal: Journal) -> list[JournalEntry]:
    out: list[JournalEntry] = []
    while batch := journal.read(1 << 20):
        out.extend(batch)
    return out


def last_frame(journal: Journal, append: list[EncodedRecord]) -> tuple[Path, int, int]:
    """Append `append` and return (segment path, frame start, frame length) of the frame it wrote."""
    paths_before, size_before = journal.segment_paths(), journal.size_bytes
    journal.append(append)
    path = journal.segment_paths()[-1]
    length = journal.size_bytes - size_before - (SEGMENT_HEADER_BYTES if path not in paths_before else 0)
    return path, path.stat().st_size - length, length


class JournalModel(RuleBasedStateMachine):
    """Any sequence of appends, reads, acks, restarts and crashes mid-append replays exactly the unacked
    suffix, in order, across segment rotation and with or without the in-memory read cache."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="journal-model-"))
        self.params: dict[str, int] = {}
        self.journal: Journal | None = None
        self.unacked: list[tuple[int, list[EncodedRecord]]] = []
        self.read_upto = 0
        self.last_seq = 0

    @initialize(cache_bytes=st.sampled_from([0, 700, 1 << 20]), segment_bytes=st.sampled_from([300, 1500, 1 << 16]))
    def open_journal(self, cache_bytes: int, segment_bytes: int) -> None:
        self.params = {"cache_bytes": cache_bytes, "segment_bytes": segment_bytes, "max_bytes": 1 << 30}
        self.journal = opened(self.directory, **self.params)

    @property
    def j(self) -> Journal:
        assert self.journal is not None
        return self.journal

    @rule(batch=batches)
    def append(self, batch: list[EncodedRecord]) -> None:
        seq = self.j.append(batch)
        assert seq > self.last_seq
        self.last_seq = seq
        self.unacked.append((seq, batch))

    @rule(max_bytes=st.integers(1, 3000))
    def read(self, max_bytes: int) -> None:
        got = self.j.read(max_bytes)
        expected = self.unacked[self.read_upto:]
        assert bool(got) == bool(expected)
        assert [(e.seq, e.records) for e in got] == expected[: len(got)]
        self.read_upto += len(got)

    @precondition(lambda self: self.read_upto > 0)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        k = data.draw(st.integers(1, self.read_upto), label="entries acked")
        self.j.ack(self.unacked[k - 1][0])
        del self.unacked[:k]
        self.read_upto -= k

    @rule()
    def restart(self) -> None:
        self.j.close_sync()
        self.journal = opened(self.directory, **self.params)
        self.read_upto = 0

    @rule(batch=batches, data=st.data(), how=st.sampled_from(["torn", "flipped"]))
    def crash_during_append(self, batch: list[EncodedRecord], data: st.DataObject, how: str) -> None:
        path, start, length = last_frame(self.j, batch)
        self.j.close_sync()
        at = start + data.draw(st.integers(0, length - 1), label="byte")
        if how == "torn":
            with path.open("r+b") as f:
                f.truncate(at)
        else:
            blob = bytearray(path.read_bytes())
            blob[at] ^= 0xFF
            path.write_bytes(bytes(blob))
        self.journal = opened(self.directory, **self.params)
        self.read_upto = 0
        # The torn entry is gone; seqs stay increasing from the last whole entry.
        self.last_seq = max([s for s, _ in self.unacked], default=self.j.acked_seq)

    @invariant()
    def counters_match_the_model(self) -> None:
        if self.journal is None:
            return
        assert self.j.pending_entries == len(self.unacked)
        assert self.j.pending_records == sum(len(b) for _, b in self.unacked)
        assert self.j.cache_bytes <= self.params["cache_bytes"]

    @invariant()
    def disk_holds_exactly_the_known_segments(self) -> None:
        if self.journal is None:
            return
        on_disk = sorted(self.directory.glob("*.seg"))
        assert on_disk == self.j.segment_paths()
        assert sum(p.stat().st_size for p in on_disk) == self.j.size_bytes

    def teardown(self) -> None:
        if self.journal is not None:
            self.journal.close_sync()
        shutil.rmtree(self.directory, ignore_errors=True)


TestJournalModel = JournalModel.TestCase
TestJournalModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=1), n=st.integers(1, 5))
def test_torn_tail_is_cut_on_open_and_appending_continues(tmp_path: Path, cut: int, n: int) -> None:
    directory = tmp_path / f"j{cut}-{n}"
    journal = opened(directory)
    for i in range(n):
        journal.append([record(i)])
    path, start, length = last_frame(journal, [record(99)])
    journal.close_sync()
    with path.open("r+b") as f:
        f.truncate(start + cut % length)

    journal = opened(directory)
    assert path.stat().st_size == start  # cut back to the last whole frame
    assert [e.records for e in read_all(journal)] == [[record(i)] for i in range(n)]
    journal.append([record(100)])
    journal.close_sync()
    journal = opened(directory)
    assert [e.records[0].ts_ms for e in read_all(journal)] == [*range(n), 100]
    journal.close_sync()


def test_torn_tail_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal = opened(tmp_path)
    journal.append([record(1)])
    path, start, _ = last_frame(journal, [record(2)])
    journal.close_sync()
    with path.open("ab") as f:
        f.write(b"\x00garbage")  # a crash between two writes can also leave junk after the last frame
    with path.open("r+b") as f:
        f.truncate(start + 5)
    with caplog.at_level(logging.WARNING, logger="ingest.io.journal"):
        journal = opened(tmp_path)
    assert [r.getMessage() for r in caplog.records] == ["journal_torn_tail"]
    assert [e.seq for e in read_all(journal)] == [1]
    journal.close_sync()


def test_corruption_in_an_older_segment_cuts_it_there_and_later_segments_still_replay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = opened(tmp_path, segment_bytes=400, max_bytes=1 << 20)
    for i in range(12):
        journal.append([record(i)])
    paths = journal.segment_paths()
    assert len(paths) >= 3
    journal.close_sync()
    blob = bytearray(paths[0].read_bytes())
    blob[-3] ^= 0x01  # last entry of the first segment
    paths[0].write_bytes(bytes(blob))

    with caplog.at_level(logging.ERROR, logger="ingest.io.journal"):
        journal = opened(tmp_path, segment_bytes=400, max_bytes=1 << 20)
    assert "journal_segment_corrupt" in [r.getMessage() for r in caplog.records]
    seqs = [e.seq for e in read_all(journal)]
    lost = set(range(1, 13)) - set(seqs)
    assert len(lost) == 1 and seqs == sorted(seqs)
    journal.close_sync()


def test_segments_rotate_at_segment_bytes_and_acknowledged_ones_are_deleted(tmp_path: Path) -> None:
    journal = opened(tmp_path, segment_bytes=500, max_bytes=1 << 20)
    for i in range(20):
        journal.append([record(i)])
    paths = journal.segment_paths()
    assert len(paths) > 3
    assert all(p.stat().st_size <= 500 for p in paths)
    entries = read_all(journal)
    journal.ack(entries[9].seq)
    assert not paths[0].exists()
    assert journal.segment_paths()[0].stat().st_size > 0
    journal.ack(entries[-1].seq)
    assert journal.segment_paths() == [paths[-1]]  # the active segment stays until it rotates
    journal.close_sync()
    journal = opened(tmp_path, segment_bytes=500, max_bytes=1 << 20)
    assert read_all(journal) == [] and journal.pending_entries == 0
    assert journal.next_seq == 21  # seqs never restart, even with every segment gone
    journal.close_sync()


def test_a_damaged_cursor_resends_everything_rather_than_lose_anything(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = opened(tmp_path)
    for i in range(3):
        journal.append([record(i)])
    journal.ack(read_all(journal)[0].seq)
    journal.close_sync()
    (tmp_path / "cursor").write_bytes(b"\x07" * 5)
    with caplog.at_level(logging.ERROR, logger="ingest.io.journal"):
        journal = opened(tmp_path)
    assert "journal_cursor_invalid" in [r.getMessage() for r in caplog.records]
    assert [e.seq for e in read_all(journal)] == [1, 2, 3]
    journal.close_sync()


def test_full_journal_refuses_appends_with_a_retriable_error_until_acks_free_space(tmp_path: Path) -> None:
    journal = opened(tmp_path, segment_bytes=600, max_bytes=1200, cache_bytes=0)
    appended = 0
    with pytest.raises(JournalFullError) as full:
        while True:
            journal.append([record(appended, size=100)])
            appended += 1
    assert full.value.retriable and not full.value.disk_full
    assert "max_bytes" in str(full.value)
    assert journal.size_bytes <= 1200
    journal.ack(read_all(journal)[-1].seq)
    journal.append([record(1000, size=100)])  # room again
    assert journal.size_bytes <= 1200
    journal.close_sync()


def test_force_append_exceeds_max_bytes_for_shutdown(tmp_path: Path) -> None:
    journal = opened(tmp_path, segment_bytes=600, max_bytes=1200)
    with pytest.raises(JournalFullError):
        for i in range(100):
            journal.append([record(i, size=100)])
    journal.append([record(500, size=100)], force=True)
    assert journal.size_bytes > 1200
    journal.close_sync()


def test_a_second_process_cannot_open_the_same_directory(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    with pytest.raises(JournalError, match="in use by another process"):
        opened(tmp_path)
    journal.close_sync()
    opened(tmp_path).close_sync()


def test_a_file_that_is_not_a_segment_is_quarantined_not_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal = opened(tmp_path)
    journal.append([record(1)])
    journal.close_sync()
    (tmp_path / "00000000000000000000.seg").write_bytes(b"not a journal segment")
    with caplog.at_level(logging.ERROR, logger="ingest.io.journal"):
        journal = opened(tmp_path)
    assert (tmp_path / "00000000000000000000.seg.corrupt").exists()
    assert [e.seq for e in read_all(journal)] == [1]
    journal.close_sync()


async def test_with_fsync_batch_entries_become_readable_only_once_synced(tmp_path: Path) -> None:
    journal = Journal(tmp_path, fsync="batch")
    await journal.start()
    journal.append([record(1)])
    assert journal.read(1 << 20) == []
    await journal.sync()
    assert [e.seq for e in journal.read(1 << 20)] == [1]
    await journal.close()


async def test_journal_is_a_sink_whose_writes_survive_a_restart(tmp_path: Path) -> None:
    sink = Journal(tmp_path, fsync="segment", segment_bytes=300, max_bytes=1 << 20)
    await sink.start()
    await sink.write([record(i) for i in range(3)])
    await sink.write([record(i) for i in range(3, 9)])
    await sink.flush()
    await sink.close()
    replay = opened(tmp_path)
    assert [r.ts_ms for e in read_all(replay) for r in e.records] == list(range(9))
    replay.close_sync()


def test_reading_from_disk_hands_over_to_the_cache_at_a_segment_boundary(tmp_path: Path) -> None:
    """Evicted entries come from disk, the rest from memory, each exactly once, when the first entry still in
    memory is also the first of its segment."""
    probe = opened(tmp_path / "probe")
    probe.append([record(0)])
    frame = probe.size_bytes - SEGMENT_HEADER_BYTES
    probe.close_sync()
    # Three frames per segment; memory for four: entries 1-3 are evicted, 4 (first of segment 2) onwards stay.
    journal = opened(tmp_path / "j", segment_bytes=SEGMENT_HEADER_BYTES + 3 * frame, cache_bytes=4 * frame,
                     max_bytes=1 << 20)
    for i in range(1, 8):
        journal.append([record(i)])
    assert len(journal.segment_paths()) == 3 and journal.cache_bytes == 4 * frame
    assert [e.seq for e in read_all(journal)] == list(range(1, 8))
    assert journal.pending_entries == 7
    journal.ack(7)
    assert journal.pending_entries == 0
    journal.close_sync()


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_interval_is_due_at_once_then_at_most_once_per_interval() -> None:
    every = Interval(0.25)
    assert every.wait_s(5.0) == 0
    every.done(5.0)
    assert every.wait_s(5.125) == 0.125
    assert every.wait_s(5.25) == 0


def test_the_cursor_is_saved_at_most_once_per_interval_and_a_crash_resends_only_what_was_acked_since(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    journal = Journal(tmp_path / "j", fsync="never", cursor_interval_s=0.25, clock=clock)
    journal.open()
    for i in range(1, 6):
        journal.append([record(i)])
    journal.read(1 << 20)
    journal.ack(1)  # the first acknowledgement is saved at once
    assert journal.saved_seq == 1 and journal.cursor_wait_s() is None
    clock.now += 0.125
    journal.ack(3)  # within the interval: in memory only
    assert (journal.acked_seq, journal.saved_seq) == (3, 1)
    assert journal.cursor_wait_s() == 0.125
    # A crash now (the files as a SIGKILL leaves them) resends entries 2-5: 2 and 3 were acknowledged
    # within the last interval, 4 and 5 never were.
    shutil.copytree(tmp_path / "j", tmp_path / "crashed")
    crashed = opened(tmp_path / "crashed")
    assert [e.seq for e in read_all(crashed)] == [2, 3, 4, 5]
    crashed.close_sync()
    clock.now += 0.125
    assert journal.cursor_wait_s() == 0
    assert journal.save_cursor() and journal.saved_seq == 3
    journal.ack(5)
    journal.close_sync()  # close saves the cursor whatever the interval
    assert read_all(opened(tmp_path / "j")) == []


async def test_fsync_batch_groups_syncs_at_most_once_per_interval_and_entries_wait_for_it(tmp_path: Path) -> None:
    clock = FakeClock()
    journal = Journal(tmp_path, fsync="batch", sync_interval_s=0.25, clock=clock)
    await journal.start()
    assert journal.sync_wait_s() == 0  # the new segment's directory entry
    await journal.sync()
    assert journal.sync_wait_s() is None  # nothing appended since: nothing to wait for
    clock.now += 0.25
    journal.append([record(1)])
    assert journal.sync_wait_s() == 0
    await journal.sync()
    assert [e.seq for e in journal.read(1 << 20)] == [1]
    journal.append([record(2)])
    clock.now += 0.125
    journal.append([record(3)])
    assert journal.sync_wait_s() == 0.125  # the next fsync waits for the interval ...
    assert journal.read(1 << 20) == []  # ... and so do the entries: nothing unsynced is sent
    clock.now += 0.125
    assert journal.sync_wait_s() == 0
    await journal.sync()  # one fsync for both
    assert [e.seq for e in journal.read(1 << 20)] == [2, 3]
    assert journal.sync_wait_s() is None
    await journal.close()


async def test_intervals_of_zero_sync_and_save_on_every_call(tmp_path: Path) -> None:
    journal = Journal(tmp_path, fsync="batch", clock=FakeClock())
    await journal.start()
    for i in (1, 2):
        journal.append([record(i)])
        assert journal.sync_wait_s() == 0
        await journal.sync()
        journal.read(1 << 20)
        journal.ack(i)
        assert journal.saved_seq == i
    await journal.close()
