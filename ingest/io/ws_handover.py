"""The 64008 make-before-break of one logical OKX WebSocket connection (a service-upgrade notice, a key rotation).

A replacement link is brought up while the old one keeps delivering; once the replacement is live (and its
pushes caught up with the old connection's, `OverlapAligner`), the old one is closed, and when it delivered
its last frame, `hand_over` emits CUTOVER for the streams proven continuous (`handover_args`, core) and
DISCONNECTED for the rest. A refused key leaves the old connection serving; a failed replacement is retried
with backoff until `notice_cutover_timeout_s`. It logs under `ingest.io.ws`, like the connection it serves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ingest.config import WsSettings
from ingest.core.events import LinkEvent, LinkEventKind
from ingest.core.wsproto import arg_from_key, handover_args
from ingest.io.timer import Timer
from ingest.io.ws_link import ConnectionCounters, Overlap, first_of
from ingest.io.ws_pump import Pump
from ingest.okx import codes

if TYPE_CHECKING:
    from ingest.io.ws import Connection

log = logging.getLogger("ingest.io.ws")


class Replacer:
    """Replaces one logical connection's link without a gap when asked to (`request`), one replacement at a time."""

    def __init__(self, conn: Connection, pump: Pump, timer: Timer, settings: WsSettings,
                 backoff: Callable[[], Iterator[float]]) -> None:
        self._conn = conn
        self._pump = pump
        self.name = conn.name
        self.counters: ConnectionCounters = conn.counters
        self.settings = settings
        self._timer = timer
        self._monotonic = timer.now
        self._backoff = backoff
        self._replace_wanted = asyncio.Event()
        self._replace_reason: tuple[str, str | None] = ("", None)

    def request(self, reason: str, code: str | None = None) -> None:
        """Start a make-before-break (`run` carries it out); a second request before it started replaces the first."""
        self._replace_reason = (reason, code)
        self._replace_wanted.set()

    async def run(self) -> None:
        """Carry out each request in turn until cancelled; a failed replacement is logged, never fatal."""
        while True:
            await self._replace_wanted.wait()
            self._replace_wanted.clear()
            reason, code = self._replace_reason
            try:
                await self._make_before_break(reason, code)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ws_replace_error", extra={"ws_name": self.name})

    async def _make_before_break(self, reason: str, code: str | None) -> None:
        """Bring up a replacement while the old connection keeps delivering, then move every stream over."""
        old = self._conn.primary
        if old is not None and not old.live.is_set():
            # Still connecting or subscribing: replace it once it is live; if it fails instead, the
            # reconnect logs in afresh anyway.
            await first_of([old.live.wait(), old.finished.wait()])
        if old is None or old is not self._conn.primary or old.finished.is_set():
            log.info("ws_replace_skipped", extra={"ws_name": self.name, "reason": reason,
                                                  "state": old.state.value if old is not None else None})
            return
        backoff = self._backoff()
        deadline = self._monotonic() + self.settings.notice_cutover_timeout_s
        while not old.finished.is_set():
            new = self._conn.new_link(replacement=True)
            ov = Overlap(old, new, reason, code)
            self._pump.overlap = ov
            # Queued before the replacement can emit anything.
            await self._pump.emit(LinkEventKind.NOTICE, old, tuple(sorted(old.owned)), code=code, reason=reason,
                                  replacement=new.conn)
            self._conn.spawn(new)
            await first_of([ov.ready.wait(), new.finished.wait(), old.finished.wait(),
                            self._timer.sleep(deadline - self._monotonic())])
            if old.finished.is_set():
                return  # the old connection ended first; its teardown handed over
            if new.finished.is_set() and new.fatal is not None:
                # A refused key (e.g. a bad rotation): the old connection keeps serving; retrying would not help.
                self._conn.last_error = str(new.fatal)
                log.error("ws_replacement_refused", extra={"ws_name": self.name, "conn": new.conn,
                                                           "error": str(new.fatal)})
                return
            if new.finished.is_set():
                delay = next(backoff)
                log.warning("ws_replacement_failed", extra={"ws_name": self.name, "conn": new.conn,
                                                            "reason": new.end_reason, "delay_s": delay})
                await first_of([old.finished.wait(), self._timer.sleep(delay)])
                continue
            log.info("ws_cutover_start", extra={"ws_name": self.name, "conn": old.conn, "replacement": new.conn,
                                                "ready": ov.ready.is_set()})
            ov.held_at_close = frozenset(new.owned)
            self._conn.request_close(old, "replaced by " + new.conn)
            await old.finished.wait()
            return

    async def hand_over(self, ov: Overlap) -> None:
        """The old connection delivered its last frame: emit CUTOVER once the replacement caught up."""
        old, new = ov.old, ov.new
        if new.finished.is_set() or not new.opened.is_set():
            async with self._pump.emitting():
                self._pump.overlap = None
            if not new.finished.is_set():
                self._conn.primary = new  # still connecting: it carries on as the primary
            return
        ov.update()
        if not ov.ready.is_set():
            await first_of([ov.ready.wait(), new.finished.wait(),
                            self._timer.sleep(self.settings.cutover_catchup_s)])
        async with self._pump.emitting():
            held, aligned_keys = ov.aligner.finish() if ov.aligner is not None else ([], set())
            aligned = frozenset(a for a in map(arg_from_key, aligned_keys) if a is not None)
            proven, gone = handover_args(frozenset(old.owned), frozenset(new.owned), aligned, ov.held_at_close,
                                         old.closed_by_us)
            now_ns = time.time_ns()
            if gone:
                await self._pump.put(LinkEvent(LinkEventKind.DISCONNECTED, old.conn, self.name, now_ns,
                                               tuple(sorted(gone)),
                                               code=str(old.close_code) if old.close_code else None,
                                               reason=f"{ov.reason}: {old.end_reason}; not proven handed over"))
            await self._pump.put(LinkEvent(LinkEventKind.CUTOVER, old.conn, self.name, now_ns, tuple(sorted(proven)),
                                           code=ov.code, reason=ov.reason, replacement=new.conn))
            for frame in held:
                await self._pump.put(frame)
            old.owned.clear()
            self._pump.overlap = None
            self._conn.primary = new
        self.counters.cutovers += 1
        log.info("ws_cutover", extra={"ws_name": self.name, "conn": old.conn, "replacement": new.conn,
                                      "carried": len(proven), "not_handed_over": len(gone),
                                      "held_frames": len(held), "closed_by_us": old.closed_by_us})
        new.work.set()
        if new.noticed:
            self._conn.request_replace("64008 notice received on the replacement", codes.SERVICE_UPGRADE_NOTICE)
