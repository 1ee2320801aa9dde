"""What the WebSocket layer hands to the data pipeline: frames and connection lifecycle events.

Both travel through one bounded queue, so the pipeline sees a disconnect exactly between the last
frame before it and the first frame after it; that order is what makes gap bounds right. The private
reconciler (`services/private.py`) puts `RestRecords` into the same queue, so REST rows meet the same
dedupe state as the pushes around them, in one order; the copy arbiter (`services/copies.py`) puts there the
gap events it decided to publish.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from ingest.core.records import DeadLetter, GapEvent, OkxRecord
from ingest.okx.channels import Endpoint, SubArg


class InboundFrame(msgspec.Struct, frozen=True, gc=False):
    """One text frame as received, before any parsing (`pong` never gets here).

    A msgspec Struct rather than a frozen dataclass: one is built per frame, and a frozen dataclass's
    `__init__` (one `object.__setattr__` per field) cost about 1 µs of the hot path.

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


@dataclass(frozen=True, slots=True)
class RestRecords:
    """Private-stream records read over REST after a hole (a reconnect, a refused subscription, start-up).

    Built by the REST row builders (`source = rest`); the pipeline lets through only what its private
    dedupe state does not already hold. The read answers every `ReconcileRequest` up to `seq` (it began
    after they were made); `covers` are their args. `since_ms` is the OKX time the read reaches back to,
    `fetched_ms` the OKX time it began, `ts_ns` the local time it ended.
    """

    seq: int
    reason: str
    ts_ns: int
    since_ms: int
    fetched_ms: int
    covers: tuple[SubArg, ...]
    records: tuple[OkxRecord | DeadLetter, ...]
    #: The read failed for good (e.g. the key lost its read permission): nothing was recovered, so the
    #: holes of `covers` must stay open rather than be reported filled.
    failed: bool = False


@dataclass(frozen=True, slots=True)
class DecidedGaps:
    """Gap events held back while another copy's positions were checked (`cluster.copies` > 1) and found not to
    cover them: published through the queue like everything else, so they keep the pipeline's accounting."""

    records: tuple[GapEvent, ...]
    ts_ns: int
    #: Called by the pipeline once the records are handed to its outlet (until then the arbiter still holds the
    #: streams' positions back, so a crash in between cannot lose the gaps).
    handed: Callable[[], None] = field(default=lambda: None, compare=False)


Inbound = InboundFrame | LinkEvent | RestRecords | DecidedGaps


class Resubscriber(Protocol):
    """Asks the WebSocket layer to resubscribe one arg (after a book break); never blocks."""

    def request_resubscribe(self, arg: SubArg, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class ReconcileRequest:
    """The pipeline asks for a REST read of the private account: data of `args` may be missing since
    `since_ns` (local time). `open_since_ms` is the creation time (OKX ms) of the oldest order the record
    still shows open: such an order may have completed in the hole, so the order history must reach back
    to it. `initial` marks the first subscription of the process (nothing recorded yet). `seq` increases
    with every request, so an answer tells which requests it covers."""

    seq: int
    reason: str
    since_ns: int
    args: frozenset[SubArg]
    open_since_ms: int | None = None
    initial: bool = False


class Reconciler(Protocol):
    """Reads the private account over REST and feeds the result back as `RestRecords`; never blocks."""

    def request_reconcile(self, request: ReconcileRequest) -> None: ...
