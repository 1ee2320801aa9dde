"""Shards, assignment and fence of cluster mode (core/cluster.py), and the `[cluster]` settings."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.config import load_settings, require_cluster
from ingest.core.cluster import (
    Ownership,
    StreamPosition,
    assign,
    decode_position,
    encode_position,
    may_publish,
    moved,
    position_key,
    shard_of,
    shard_of_arg,
    shards_of_args,
)
from ingest.core.gaps import GapKind, Position, StreamCheckpoint
from ingest.errors import ConfigError
from ingest.okx.channels import SubArg

members_st = st.sets(st.from_regex(r"okx-ingest-[0-9]{1,3}", fullmatch=True), min_size=1, max_size=12)
shards_st = st.integers(min_value=1, max_value=256)


def _check_balanced(plan: dict[str, list[int]], shards: int) -> None:
    owned = [s for ss in plan.values() for s in ss]
    assert sorted(owned) == list(range(shards)), "every shard exactly once"
    counts = [len(ss) for ss in plan.values()]
    assert max(counts) - min(counts) <= 1


def test_shard_is_blake2b_of_the_inst_id_so_other_implementations_can_compute_it() -> None:
    digest = hashlib.blake2b(b"BTC-USDT", digest_size=8).digest()
    assert shard_of("BTC-USDT", 64) == int.from_bytes(digest, "big") % 64


def test_every_channel_of_one_instrument_lands_on_one_shard() -> None:
    args = [SubArg(ch, inst_id=inst) for inst in ("BTC-USDT", "ETH-USDT", "SOL-USDT-SWAP")
            for ch in ("trades", "books", "tickers", "bbo-tbt", "candle1m")]
    groups = shards_of_args(args, 64)
    assert sum(len(g) for g in groups.values()) == len(args)
    for inst in ("BTC-USDT", "ETH-USDT", "SOL-USDT-SWAP"):
        assert len({shard_of_arg(a, 64) for a in args if a.inst_id == inst}) == 1


@given(st.text(min_size=1, max_size=40), shards_st)
def test_shard_of_is_in_range_and_stable(key: str, shards: int) -> None:
    assert 0 <= shard_of(key, shards) < shards
    assert shard_of(key, shards) == shard_of(key, shards)


def test_instruments_spread_over_the_shards() -> None:
    counts = [0] * 64
    for i in range(6400):
        counts[shard_of(f"INST{i}-USDT", 64)] += 1
    assert min(counts) > 50 and max(counts) < 150


@given(members_st, shards_st)
def test_assignment_is_balanced_and_covers_every_shard_once(members: set[str], shards: int) -> None:
    _check_balanced(assign(members, shards), shards)


@given(members_st, shards_st, st.randoms())
def test_assignment_does_not_depend_on_member_order(members: set[str], shards: int, rnd: object) -> None:
    names = sorted(members)
    shuffled = list(names)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert assign(names, shards) == assign(shuffled, shards)


@settings(max_examples=200)
@given(members_st, shards_st, st.from_regex(r"new-[0-9]{1,3}", fullmatch=True))
def test_a_joining_member_takes_only_its_quota(members: set[str], shards: int, newcomer: str) -> None:
    before = assign(members, shards)
    previous = {s: m for m, ss in before.items() for s in ss}
    after = assign([*members, newcomer], shards, previous)
    _check_balanced(after, shards)
    assert moved(before, after) == len(after[newcomer])
    assert len(after[newcomer]) <= -(-shards // (len(members) + 1))


@settings(max_examples=200)
@given(members_st.filter(lambda m: len(m) >= 2), shards_st, st.data())
def test_a_leaving_member_moves_only_its_own_shards(members: set[str], shards: int, data: st.DataObject) -> None:
    before = assign(members, shards)
    gone = data.draw(st.sampled_from(sorted(members)))
    previous = {s: m for m, ss in before.items() for s in ss}
    after = assign(members - {gone}, shards, previous)
    _check_balanced(after, shards)
    assert moved({m: ss for m, ss in before.items() if m != gone}, after) == len(before[gone])


@given(members_st, shards_st, st.dictionaries(st.integers(0, 300), st.sampled_from(["a", "b", "zombie"])))
def test_any_previous_claims_still_give_a_balanced_plan(members: set[str], shards: int,
                                                        previous: dict[int, str]) -> None:
    _check_balanced(assign(members | {"a"}, shards, previous), shards)


def test_fence_drops_records_of_a_shard_lost_and_of_another_owner() -> None:
    own = Ownership("r0", 5, {1: 3, 2: 5})
    assert may_publish(own, "r0", 4, 1)  # kept since generation 3
    assert not may_publish(own, "r0", 4, 2)  # won back in 5: what was stamped in 4 predates the loss
    assert not may_publish(own, "r0", 5, 7)  # not ours
    assert not may_publish(own, "r1", 5, 1)
    assert not may_publish(None, "r0", 5, 1)
    later = own.advance(6, [1])
    assert may_publish(later, "r0", 5, 1) and not may_publish(later, "r0", 6, 2)
    assert later.since == {1: 3}


def _cfg(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text('[kafka]\nbootstrap_servers = "k:9092"\n' + text)
    return path


def test_cluster_is_off_by_default_and_needs_no_name(tmp_path: Path) -> None:
    s = load_settings(_cfg(tmp_path, ""))
    assert not s.cluster.enabled and s.cluster.shards == 64
    assert require_cluster(s, {}) is None


def test_the_replica_name_comes_from_the_setting_or_hostname(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings(_cfg(tmp_path, '[cluster]\ngroup_id = "g"\n'))
    assert require_cluster(s, {"HOSTNAME": "okx-ingest-2"}) == "okx-ingest-2"
    monkeypatch.setenv("OKX_INGEST__CLUSTER__INSTANCE_ID", "rep-1")
    s = load_settings(_cfg(tmp_path, '[cluster]\ngroup_id = "g"\n'))
    assert require_cluster(s, {"HOSTNAME": "okx-ingest-2"}) == "rep-1"


def test_cluster_without_a_replica_name_is_refused_naming_the_key(tmp_path: Path) -> None:
    s = load_settings(_cfg(tmp_path, '[cluster]\ngroup_id = "g"\n'))
    with pytest.raises(ConfigError) as err:
        require_cluster(s, {})
    assert err.value.key == "cluster.instance_id"


@pytest.mark.parametrize(("text", "key"), [
    ("copies = 5", "cluster.copies"),
    ("copies = 2\ncopy_index = 2", "cluster"),
    ("shards = 0", "cluster.shards"),
    ('instance_id = "a b"', "cluster.instance_id"),
    ('group_id = " "', "cluster.group_id"),
    ("session_timeout_ms = 2000\nheartbeat_interval_ms = 1000", "cluster"),
])
def test_bad_cluster_settings_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(_cfg(tmp_path, f"[cluster]\n{text}\n"))
    assert err.value.key == key


def test_cluster_refuses_the_embedded_broker_and_private_streams(tmp_path: Path) -> None:
    path = tmp_path / "e.toml"
    path.write_text('[cluster]\ngroup_id = "g"\ninstance_id = "r0"\n')
    with pytest.raises(ConfigError) as err:
        require_cluster(load_settings(path), {})
    assert err.value.key == "kafka.bootstrap_servers"
    s = load_settings(_cfg(tmp_path, '[okx]\nprivate = true\n[cluster]\ngroup_id = "g"\ninstance_id = "r0"\n'))
    with pytest.raises(ConfigError) as err:
        require_cluster(s, {})
    assert err.value.key == "okx.private"


def test_a_position_survives_the_positions_topic_and_garbage_is_ignored() -> None:
    cp = StreamCheckpoint(SubArg("trades-all", inst_id="BTC-USDT"), Position(1_700_000_000_000, 42, None), "s3-x#1",
                          "SPOT", GapKind.DISCONNECT, Position(1_700_000_000_000, 42, None), "s3-x#1", 7, "lost")
    p = StreamPosition(3, "okx-ingest-1", 9, 123, cp)
    assert decode_position(encode_position(p)) == p
    assert position_key(cp.arg) == position_key(SubArg("trades-all", inst_id="BTC-USDT"))
    for bad in (None, b"", b"{", b'{"v": 99}', b'{"v": 1, "shard": 1}', b"[]"):
        assert decode_position(bad) is None
