"""Which replica records what: shards of the subscription set, their assignment to replicas, and the fence.

Pure, and the same in every replica (docs/CLUSTER.md):

* `shard_of`: an instrument's shard is BLAKE2b-64 of its key (the instId, else the instFamily, instType,
  ccy or channel that scopes the arg) modulo the shard count, so every channel of one instId lands on one
  shard, and so on one replica's connections (books and trades of BTC-USDT are never split).
* `assign`: the group leader's plan. Strictly balanced (every replica gets floor or ceil of shards/replicas),
  and within that it keeps as many shards where they were as possible: the replicas that held the most get
  the larger quotas, each keeps its previous shards up to its quota (those it ranks highest by rendezvous
  weight first), and the shards left over go by rendezvous hashing (highest weight among replicas with room).
  A replica leaving moves only its own shards; one joining takes only its quota.
* `Ownership` / `may_publish`: a record of a shard is published only by the replica that owns the shard in the
  current generation; anything else is fenced (a zombie woken after its session expired).
* `StreamPosition`: one stream's position as its owner writes it to the compacted `<prefix>positions` topic
  (keyed by `position_key`), so whichever replica takes the shard over knows where its predecessor stopped.
* `copy_covers`: with `cluster.copies` > 1, whether another copy's position proves it recorded a gap's whole
  window without a hole of its own (then the gap is no loss and is not raised).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import orjson

from ingest.core.gaps import TRADE_CHANNELS, Gap, Position, StreamCheckpoint
from ingest.okx.channels import SubArg

__all__ = [
    "Ownership",
    "StreamPosition",
    "assign",
    "copy_covers",
    "decode_position",
    "encode_position",
    "may_publish",
    "moved",
    "position_key",
    "shard_key",
    "shard_of",
    "shard_of_arg",
    "shards_of_args",
]


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def shard_key(arg: SubArg) -> str:
    """What an arg is sharded by: its instrument, so that all channels of one instId stay together."""
    return arg.inst_id or arg.inst_family or arg.inst_type or arg.ccy or arg.channel


def shard_of(key: str, shards: int) -> int:
    """The shard of an instrument key: BLAKE2b (64-bit digest, big-endian) of its UTF-8 bytes mod `shards`."""
    if shards <= 0:
        raise ValueError("shards must be positive")
    return _hash64(key) % shards


def shard_of_arg(arg: SubArg, shards: int) -> int:
    return shard_of(shard_key(arg), shards)


def shards_of_args(args: Iterable[SubArg], shards: int) -> dict[int, list[SubArg]]:
    """The configured args grouped by shard (shards without args are absent), each group in config order."""
    out: dict[int, list[SubArg]] = {}
    for arg in args:
        out.setdefault(shard_of_arg(arg, shards), []).append(arg)
    return out


def _weight(member: str, shard: int) -> int:
    """Rendezvous weight of a member for a shard: the highest weight wins a free shard."""
    return _hash64(f"{member}\x00{shard}")


def assign(members: Iterable[str], shards: int, previous: Mapping[int, str] | None = None) -> dict[str, list[int]]:
    """Every shard 0..shards-1 to exactly one member, balanced to within one, moving as few as possible.

    `previous` maps a shard to the member that held it (claims of members no longer present are ignored). The
    result depends only on the set of members, `shards` and `previous`, never on the order members are given.
    """
    names = sorted(set(members))
    if not names:
        return {}
    prev = {s: m for s, m in (previous or {}).items() if 0 <= s < shards and m in names}
    held: dict[str, list[int]] = {m: [] for m in names}
    for s, m in prev.items():
        held[m].append(s)
    base, extra = divmod(shards, len(names))
    # The larger quotas go to the members that held the most (fewest moves); ties by name, for determinism.
    ranked = sorted(names, key=lambda m: (-len(held[m]), m))
    quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(ranked)}
    out: dict[str, list[int]] = {m: [] for m in names}
    taken: set[int] = set()
    for m in names:
        keep = sorted(held[m], key=lambda s: (-_weight(m, s), s))[:quota[m]]
        out[m].extend(keep)
        taken.update(keep)
    for s in range(shards):
        if s in taken:
            continue
        room = [m for m in names if len(out[m]) < quota[m]]
        winner = max(room, key=lambda m: (_weight(m, s), m))
        out[winner].append(s)
    return {m: sorted(v) for m, v in out.items()}


def moved(before: Mapping[str, Sequence[int]], after: Mapping[str, Sequence[int]]) -> int:
    """How many shards changed owner between two assignments (a shard unowned before counts as moved)."""
    owner = {s: m for m, ss in before.items() for s in ss}
    return sum(1 for m, ss in after.items() for s in ss if owner.get(s) != m)


@dataclass(frozen=True, slots=True)
class Ownership:
    """What this replica owns right now: its member name, the group generation, and for each shard it owns the
    generation since which it has held that shard without interruption."""

    member: str
    generation: int
    since: Mapping[int, int]

    @property
    def shards(self) -> frozenset[int]:
        return frozenset(self.since)

    def advance(self, generation: int, shards: Iterable[int]) -> Ownership:
        """The ownership after a rebalance to `generation`: kept shards keep their `since`, new ones start now."""
        return Ownership(self.member, generation, {s: self.since.get(s, generation) for s in shards})


def may_publish(current: Ownership | None, member: str, generation: int, shard: int) -> bool:
    """Whether a record stamped (member, generation, shard) may still be published: only while that member has
    owned the shard without interruption since that generation. A shard lost and won back fences what was
    stamped before the loss; a shard kept across rebalances does not."""
    if current is None or current.member != member:
        return False
    since = current.since.get(shard)
    return since is not None and since <= generation <= current.generation


POSITION_FORMAT = 1


def position_key(arg: SubArg, copy: int = 0) -> bytes:
    """The key of a stream on the positions topic: its OKX arg as compact JSON with sorted keys, and for a copy
    other than 0 `|copy=N` after it (each copy keeps its own position of every stream)."""
    key = orjson.dumps(arg.to_okx(), option=orjson.OPT_SORT_KEYS)
    return key if not copy else key + f"|copy={copy}".encode()


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """Where one stream stood at `saved_ts_ns`, every record up to it acknowledged by Kafka, and who wrote it."""

    shard: int
    member: str
    generation: int
    saved_ts_ns: int
    checkpoint: StreamCheckpoint
    #: Which copy wrote it (`cluster.copies`; 0 with one copy).
    copy: int = 0


def encode_position(p: StreamPosition) -> bytes:
    return orjson.dumps({"v": POSITION_FORMAT, "shard": p.shard, "member": p.member, "generation": p.generation,
                         "saved_ts_ns": p.saved_ts_ns, "stream": p.checkpoint.to_json(), "copy": p.copy})


def decode_position(data: bytes | None) -> StreamPosition | None:
    """The position in a value of the positions topic; None for a tombstone or anything it cannot read."""
    if not data:
        return None
    try:
        d = orjson.loads(data)
        if d.get("v") != POSITION_FORMAT:
            return None
        return StreamPosition(int(d["shard"]), str(d["member"]), int(d["generation"]), int(d["saved_ts_ns"]),
                              StreamCheckpoint.from_json(d["stream"]), int(d.get("copy", 0)))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


def _at_most(channel: str, a: Position, b: Position) -> bool:
    """Whether `a` provably comes no later than `b` in one stream (False when that cannot be told). Trades by
    tradeId only (both set: a negative id has none). Books by seqId and ts together (OKX allocates seqIds per
    instrument, the same on every connection, but may restart them at maintenance: the ts catches a reset).
    Anything else by ts, strictly (a ts may repeat across pushes, as a candle's bar start does, so an equal ts
    proves nothing)."""
    if channel in TRADE_CHANNELS:
        return a.trade_id is not None and b.trade_id is not None and a.trade_id <= b.trade_id
    if a.ts is None or b.ts is None:
        return False
    if a.seq_id is not None and b.seq_id is not None:
        return a.seq_id <= b.seq_id and a.ts <= b.ts
    return a.ts < b.ts


def copy_covers(gap: Gap, peer: StreamPosition) -> bool:
    """Whether another copy's acknowledged position proves it recorded everything `gap` may lack: its unbroken
    run (`since` .. `last`) begins no later than the gap's `before` and reaches its `after`. A gap that did not
    close (`after` None: a subscription that failed) is covered while the other copy's run is unbroken and holds
    data from after the gap was detected. A gap without `before` (nothing received yet) is never covered."""
    cp = peer.checkpoint
    if gap.before is None or cp.since is None or cp.last is None or cp.arg != gap.arg:
        return False
    if not _at_most(gap.channel, cp.since, gap.before):
        return False
    if gap.after is None:
        return cp.open_kind is None and cp.last.ts is not None and cp.last.ts * 1_000_000 > gap.detected_ts_ns
    return _at_most(gap.channel, gap.after, cp.last)
