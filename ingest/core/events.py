"""What the WebSocket layer hands to the data pipeline: frames and connection lifecycle events.

Both travel through one bounded queue, so the pipeline sees a disconnect exactly between the last
frame before it and the first frame after it; that order is what makes gap bounds right.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from ingest.okx.channels import Endpoint, SubArg


@dataclass(frozen=True, slots=True)
class InboundFrame:
    """One text frame as received, before any parsing (`pong` never gets here).

    `conn` names one physical connection for its whole life and is never reused (it embeds a
    generation), so (`conn`, `recv_seq`) identifies a frame forever; `recv_seq` starts at 1.
    `name` is the logical connection (stable across reconnects), e.g. "public-0".
    """

    conn: str
    name: str
    endpoint: Endpoint
    recv_seq: int
    recv_ts_ns: int
    data: bytes
    okx_conn_id: str | None = None


class LinkEventKind(enum.StrEnum):
    """Lifecycle of a connection as far as the data is concerned."""

    #: The connection holds these args now (acks received); frames for them may follow.
    SUBSCRIBED = "subscribed"
    #: The connection is gone; data for its args may be missed until a SUBSCRIBED for them.
    DISCONNECTED = "disconnected"
    #: Subscribing these args failed for good (e.g. 64003, 60018); no data will come for them.
    SUBSCRIBE_FAILED = "subscribe_failed"
    #: A 64008 notice arrived; a replacement connection (`replacement`) is being opened.
    NOTICE = "notice"
    #: The old connection `conn` has handed its args over to `replacement` and will be closed.
    CUTOVER = "cutover"


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """A lifecycle event of one physical connection, for the args it concerns."""

    kind: LinkEventKind
    conn: str
    name: str
    ts_ns: int
    args: tuple[SubArg, ...]
    code: str | None = None
    reason: str = ""
    replacement: str | None = None


Inbound = InboundFrame | LinkEvent


class Resubscriber(Protocol):
    """Asks the WebSocket layer to resubscribe one arg (after a book break); never blocks."""

    def request_resubscribe(self, arg: SubArg, reason: str) -> None: ...
