"""The simulated order book, pure: integer levels, change tracking, depth views and OKX's CRC32 checksum.

Prices and sizes are integer units (see `numbers`). Every change is recorded in a delta that the market
turns into one `update` push per step, so an update carries exactly the levels that changed and a
client applying it reproduces the simulator's book level for level.
"""

from __future__ import annotations

import zlib
from bisect import bisect_left, insort

#: A level as pushed: (price units, size units, order count); size 0 deletes.
Level = tuple[int, int, int]


def signed32(value: int) -> int:
    return value - (1 << 32) if value >= (1 << 31) else value


def okx_checksum(bids: list[list[str]], asks: list[list[str]]) -> int:
    """SPEC 7.3: CRC32 over the first 25 bids and asks interleaved (bid first), `px:sz` strings, signed 32-bit."""
    parts: list[str] = []
    for i in range(25):
        if i < len(bids):
            parts += (bids[i][0], bids[i][1])
        if i < len(asks):
            parts += (asks[i][0], asks[i][1])
    return signed32(zlib.crc32(":".join(parts).encode()))


class Book:
    """Both sides of one instrument's book, best first, with the levels changed since the last `take_delta`."""

    __slots__ = ("_ask_keys", "_bid_keys", "asks", "bids", "delta_asks", "delta_bids")

    def __init__(self) -> None:
        self.bids: dict[int, tuple[int, int]] = {}
        self.asks: dict[int, tuple[int, int]] = {}
        self._bid_keys: list[int] = []  # negated prices, ascending: index 0 is the best bid
        self._ask_keys: list[int] = []  # prices ascending: index 0 is the best ask
        self.delta_bids: dict[int, tuple[int, int]] = {}
        self.delta_asks: dict[int, tuple[int, int]] = {}

    def set(self, is_bid: bool, px: int, sz: int, count: int) -> None:
        """Insert, replace or (sz == 0) delete the level at `px`, recording the change."""
        levels = self.bids if is_bid else self.asks
        keys = self._bid_keys if is_bid else self._ask_keys
        delta = self.delta_bids if is_bid else self.delta_asks
        key = -px if is_bid else px
        if sz <= 0:
            if px in levels:
                del levels[px]
                del keys[bisect_left(keys, key)]
                delta[px] = (0, 0)
            return
        if px not in levels:
            insort(keys, key)
        levels[px] = (sz, max(1, count))
        delta[px] = levels[px]

    def best(self, is_bid: bool) -> int | None:
        keys = self._bid_keys if is_bid else self._ask_keys
        if not keys:
            return None
        return -keys[0] if is_bid else keys[0]

    def worst(self, is_bid: bool) -> int | None:
        keys = self._bid_keys if is_bid else self._ask_keys
        if not keys:
            return None
        return -keys[-1] if is_bid else keys[-1]

    def price_at(self, is_bid: bool, index: int) -> int:
        keys = self._bid_keys if is_bid else self._ask_keys
        return -keys[index] if is_bid else keys[index]

    def size(self, is_bid: bool) -> int:
        return len(self._bid_keys if is_bid else self._ask_keys)

    def top(self, is_bid: bool, n: int) -> list[Level]:
        """The best `n` levels of one side, best first."""
        levels = self.bids if is_bid else self.asks
        keys = (self._bid_keys if is_bid else self._ask_keys)[:n]
        if is_bid:
            return [(-k, *levels[-k]) for k in keys]
        return [(k, *levels[k]) for k in keys]

    def take_delta(self) -> tuple[dict[int, tuple[int, int]], dict[int, tuple[int, int]]]:
        """The (bids, asks) changes since the last call, then start a new delta."""
        bids, asks = self.delta_bids, self.delta_asks
        self.delta_bids, self.delta_asks = {}, {}
        return bids, asks

    @property
    def changed(self) -> bool:
        return bool(self.delta_bids or self.delta_asks)


def view_diff(prev: list[Level], new: list[Level]) -> list[Level]:
    """Levels that turn the depth view `prev` into `new` (size 0 for a level that left the view)."""
    before = {px: (sz, cnt) for px, sz, cnt in prev}
    out: list[Level] = []
    after: set[int] = set()
    for px, sz, cnt in new:
        after.add(px)
        if before.get(px) != (sz, cnt):
            out.append((px, sz, cnt))
    out.extend((px, 0, 0) for px in before if px not in after)
    return out
