"""Reconnect and retry delays: capped exponential backoff with full jitter, as a plain generator.

A generator (as in websockets' `backoff()`) lets tests swap in a scaled-down or deterministic one
without patching, and lets the caller decide when to reset it: only after a connection has been
healthy for a while, never just because it opened (see STYLE "lessons").
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator


def full_jitter(
    initial_s: float = 0.1,
    cap_s: float = 30.0,
    factor: float = 2.0,
    rand: Callable[[], float] = random.random,
) -> Iterator[float]:
    """Endless delays: attempt n waits uniform(0, min(cap, initial * factor**n)).

    Full jitter (AWS architecture blog, "Exponential Backoff And Jitter") spreads a reconnect storm of
    many connections evenly instead of letting them retry in lock-step. Never raises StopIteration:
    the daemon never gives up.
    """
    if initial_s <= 0 or cap_s < initial_s or factor < 1:
        raise ValueError(f"backoff needs 0 < initial_s <= cap_s and factor >= 1, got {initial_s}, {cap_s}, {factor}")
    ceiling = initial_s
    while True:
        yield rand() * ceiling
        ceiling = min(cap_s, ceiling * factor)


def equal_jitter(
    initial_s: float = 0.1,
    cap_s: float = 30.0,
    factor: float = 2.0,
    rand: Callable[[], float] = random.random,
    *,
    skip: int = 0,
) -> Iterator[float]:
    """Endless delays: attempt n waits uniform(c/2, c) with c = min(cap, initial * factor**(n + skip)).

    For retries that must really wait (the backfill's transient failures): unlike full jitter a delay is
    never near zero, so a try is never used up within milliseconds, and the floor grows with every try.
    `skip` starts the sequence further along (a gap that already failed `skip` times waits longer).
    """
    if initial_s <= 0 or cap_s < initial_s or factor < 1 or skip < 0:
        raise ValueError(f"backoff needs 0 < initial_s <= cap_s, factor >= 1 and skip >= 0, got {initial_s}, "
                         f"{cap_s}, {factor}, {skip}")
    ceiling = min(cap_s, initial_s * factor ** min(skip, 64))
    while True:
        yield ceiling / 2 + rand() * ceiling / 2
        ceiling = min(cap_s, ceiling * factor)
