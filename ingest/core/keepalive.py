"""OKX's application keepalive for one physical connection, sans-I/O: time in, one decision out.

OKX closes a connection that received nothing for 30 s (SPEC 4), so after `keepalive_s` of silence the
client sends the text `ping`; OKX answers `pong`. If nothing at all (pong or data) arrives within
`pong_timeout_s` after the ping, the connection is dead and is aborted. Silence that is ours (the socket
paused for back-pressure, a message read but not yet handed over) is not the peer's: it counts as traffic,
since a pong waiting behind it could not be seen yet.
"""

from __future__ import annotations

import enum


class KeepaliveAction(enum.Enum):
    """What the connection must do now."""

    WAIT = "wait"
    PING = "ping"
    ABORT = "abort"


class Keepalive:
    """The watchdog's state: when something last arrived, when the unanswered ping went out."""

    __slots__ = ("keepalive_s", "last_rx", "ping_sent", "pong_timeout_s")

    def __init__(self, keepalive_s: float, pong_timeout_s: float, now: float) -> None:
        self.keepalive_s = keepalive_s
        self.pong_timeout_s = pong_timeout_s
        #: When the last inbound frame (pong included) arrived; the reader stamps it, on the hot path.
        self.last_rx = now
        self.ping_sent: float | None = None

    def tick(self, now: float, backlogged: bool = False) -> KeepaliveAction:
        """The decision at `now`; `backlogged`: frames wait on our side, so silence is ours."""
        if backlogged:
            self.last_rx = now
        if self.ping_sent is not None and self.last_rx >= self.ping_sent:
            self.ping_sent = None  # something arrived after the ping: the connection is alive
        # Compared with the very sums `next_deadline` returns: woken at a deadline, the decision changes
        # (`now - last_rx >= keepalive_s` can be False there by a rounding error, and the timer would spin).
        if self.ping_sent is not None and now >= self.ping_sent + self.pong_timeout_s:
            return KeepaliveAction.ABORT
        if self.ping_sent is None and now >= self.last_rx + self.keepalive_s:
            return KeepaliveAction.PING
        return KeepaliveAction.WAIT

    def pinged(self, now: float) -> None:
        """The ping went out at `now`."""
        self.ping_sent = now

    def next_deadline(self) -> float:
        """When `tick` may decide differently, if nothing arrives before."""
        if self.ping_sent is not None:
            return self.ping_sent + self.pong_timeout_s
        return self.last_rx + self.keepalive_s
