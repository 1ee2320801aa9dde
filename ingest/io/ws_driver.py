"""Carries out what each link's `LinkSession` (core) decides, for one logical OKX WebSocket connection.

The session decides (login and subscribe answers, retries and parking, keepalive, the hourly request budget,
timeouts); this module does it: one outbound loop per link (`drive`: tick, carry out, send what the budget
admits, sleep on the injected timer until the next deadline or until the reader brings work), the reader's
answers (`on_event`), the login's consequences for the key and the clock, and the pause of signed traffic
before a private connect (`wait_auth_pause`). It logs under `ingest.io.ws`, like the connection it serves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from websockets.exceptions import ConnectionClosed

from ingest.core.clock import ServerClock
from ingest.core.session import (
    AbortLink,
    ChannelCount,
    CloseLink,
    ConnCountExceeded,
    Decision,
    Emit,
    Entered,
    FailedArg,
    LinkFailed,
    LinkPhase,
    LoginAnswered,
    NoticeSeen,
    ParkedArg,
    Recovered,
    Resubscribing,
    Retrying,
    SendPing,
    Split,
    UnexpectedSeen,
)
from ingest.core.wsproto import PING, LoggedIn, LoginAction, LoginRefused, OkxEvent, counts_against_key
from ingest.credentials import CredentialStore
from ingest.io.timer import Timer
from ingest.io.ws_link import ConnState, Link, LinkFailure, LoginRejected, first_of
from ingest.io.ws_pump import Pump

if TYPE_CHECKING:
    from ingest.io.ws import Connection

log = logging.getLogger("ingest.io.ws")


class SessionDriver:
    """The session side of one logical connection's links (one instance per `Connection`)."""

    def __init__(self, conn: Connection, pump: Pump, timer: Timer, *, credentials: CredentialStore | None,
                 clock: ServerClock, resync_clock: Callable[[], Awaitable[None]] | None) -> None:
        self._conn = conn
        self._pump = pump
        self.name = conn.name
        self.url = conn.url
        self.login = conn.login
        self.counters = conn.counters
        self._timer = timer
        self._monotonic = timer.now
        self._credentials = credentials
        self._clock = clock
        self._resync_clock = resync_clock

    async def on_event(self, link: Link, ev: OkxEvent) -> None:
        for decision in link.session.receive(ev, self._monotonic()):
            await self._carry_out(link, decision)

    async def _carry_out(self, link: Link, decision: Decision) -> None:
        """Do what the session decided for one outcome: wake waiters, log, emit, in the session's order."""
        if decision.progress or decision.work:
            link.work.set()
        base = {"conn": link.conn, "ws_name": self.name}
        for act in decision.actions:
            if isinstance(act, Emit):
                await self._pump.emit(act.kind, link, act.args, code=act.code, reason=act.reason)
            elif isinstance(act, LoginAnswered):
                await self._logged_in(link, act.result)
            elif isinstance(act, Entered):
                self._entered(link, act.phase)
            elif isinstance(act, SendPing):
                assert link.ws is not None
                await link.ws.send(PING)
                self.counters.pings += 1
            elif isinstance(act, AbortLink):
                self.counters.pong_timeouts += 1
                link.end_reason = link.end_reason or act.reason
                link.abnormal = True
                log.warning("ws_pong_timeout", extra=base)
                if link.ws is not None:
                    link.ws.abort()
            elif isinstance(act, LinkFailed):
                if act.login:
                    self.counters.login_failures += 1
                raise LinkFailure(act.reason)
            elif isinstance(act, Resubscribing):
                self.counters.resubscribes += len(act.args)
                log.info("ws_resubscribe", extra={**base, "arg_count": len(act.args), "first_arg": str(act.args[0]),
                                                  "reason": "; ".join(sorted(act.reasons))[:200]})
            elif isinstance(act, Recovered):
                log.info("ws_subscribe_recovered", extra={**base, "arg": str(act.arg)})
            elif isinstance(act, Retrying):
                log.warning("ws_subscribe_retry", extra={**base, "arg": str(act.arg), "code": act.code,
                                                         "attempt": act.retry.attempt, "delay_s": act.retry.delay_s})
            elif isinstance(act, ParkedArg):
                self.counters.subscribe_failures += 1
                log.error("ws_subscribe_parked", extra={**base, "arg": str(act.arg), "code": act.why,
                                                        "retry_in_s": act.parked.delay_s, "times": act.parked.times})
            elif isinstance(act, FailedArg):
                self.counters.subscribe_failures += 1
                log.error("ws_subscribe_failed", extra={**base, "arg": str(act.arg), "code": act.code,
                                                        "okx_msg": act.msg})
            elif isinstance(act, CloseLink):
                log.warning("ws_subscribe_needs_reconnect", extra={**base, "arg": str(act.arg), "code": act.code})
                self._conn.request_close(link, act.reason)
            elif isinstance(act, Split):
                log.info("ws_subscribe_split", extra={**base, "code": act.code,
                                                      "arg_count": len(act.request.args)})
            elif isinstance(act, NoticeSeen):
                self.counters.notices += 1
                log.warning("ws_notice", extra={**base, "code": act.code, "okx_msg": act.msg})
                if link is self._conn.primary and (self._pump.overlap is None or self._pump.overlap.old is not link):
                    self._conn.request_replace(f"{act.code} notice: {act.msg}", act.code)
            elif isinstance(act, ChannelCount):
                log.info("ws_channel_conn_count", extra={**base, "channel": act.channel, "count": act.count})
            elif isinstance(act, ConnCountExceeded):
                log.error("ws_subscribe_failed", extra={**base, "channel": act.channel,
                                                        "arg_count": len(act.dropped), "okx_msg": act.reason})
            elif isinstance(act, UnexpectedSeen):
                log.warning("ws_unexpected_event", extra={**base, "event": act.event.event, "code": act.event.code,
                                                          "why": act.why})

    # ------------------------------------------------------------------------------------------ outbound

    async def drive(self, link: Link) -> None:
        """The one outbound loop of a link: tick the session, carry out its decisions, send what the budget
        allows, sleep until its next deadline (or until the reader brings work); a failure closes the socket."""
        session = link.session
        try:
            login = None
            if self.login:
                assert self._credentials is not None
                self._conn.set_link_state(link, ConnState.LOGGING_IN)
                creds = self._credentials.current()
                link.creds_version, link.key_hint = self._credentials.version, creds.key_hint
                login = link.proto.login(creds, self._clock.now_ms())
            else:
                self._conn.set_link_state(link, ConnState.SUBSCRIBING)
            session.start(login, self._monotonic())
            while session.phase is not LinkPhase.ENDED:
                link.work.clear()
                session.tick(self._monotonic(), backlogged=link.backlogged,
                             may_resubscribe=link is self._conn.primary and self._pump.overlap is None)
                for decision in session.events():
                    await self._carry_out(link, decision)
                await self._send_due(link)
                await first_of([link.work.wait(), self._timer.sleep(session.next_deadline() - self._monotonic())])
        except LinkFailure as failure:
            link.fatal = failure.fatal
            log.warning("ws_link_failed", extra={"conn": link.conn, "ws_name": self.name, "reason": failure.reason,
                                                 "fatal": failure.fatal is not None})
            self._conn.request_close(link, failure.reason)
        except (ConnectionClosed, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("ws_driver_error", extra={"conn": link.conn, "ws_name": self.name})
            self._conn.request_close(link, f"unexpected {type(exc).__name__}: {exc}")

    async def _send_due(self, link: Link) -> None:
        """Send the requests the session's hourly budget admits now; the rest wait for its next deadline."""
        ws = link.ws
        assert ws is not None
        session = link.session
        was_waiting = session.budget_at is not None
        for req in session.requests_to_send(self._monotonic()):
            await ws.send(req.payload.decode())
            self.counters.requests += 1
            log.debug("ws_request", extra={"conn": link.conn, "ws_name": self.name, "op": req.op, "id": req.id,
                                           "arg_count": len(req.args)})
        if session.budget_at is not None and not was_waiting:  # one line per wait, not per wake-up
            log.warning("ws_budget_wait", extra={"conn": link.conn, "ws_name": self.name, "op": session.outbox[0].op,
                                                 "delay_s": round(session.budget_at - self._monotonic(), 3),
                                                 "limit": link.budget.limit})

    def _entered(self, link: Link, phase: LinkPhase) -> None:
        if phase is LinkPhase.SUBSCRIBING:
            self._conn.set_link_state(link, ConnState.SUBSCRIBING)
            return
        link.live_since = self._monotonic()
        self._conn.set_link_state(link, ConnState.LIVE)
        link.live.set()
        ov = self._pump.overlap
        if ov is not None and ov.new is link and ov.aligner is not None:
            ov.aligner.mark_subscribed()
            ov.update()

    async def wait_auth_pause(self, link: Link) -> None:
        """Wait out a pause of signed traffic (repeated authentication failures, REST or WebSocket:
        `credentials.AuthFailureGuard`) before connecting, so a bad key is not retried in a loop; a credential
        rotation ends the pause at once."""
        store = self._credentials
        assert store is not None
        remaining = store.auth.pause_remaining()
        if remaining <= 0:
            return
        self._conn.set_link_state(link, ConnState.BACKING_OFF, "authentication paused")
        log.warning("ws_login_paused", extra={"conn": link.conn, "ws_name": self.name, "pause_s": round(remaining, 3),
                                              "key": store.current().key_hint})
        await first_of([self._timer.sleep(remaining), store.wait_changed(store.version)])

    async def _logged_in(self, link: Link, result: LoggedIn | LoginRefused) -> None:
        """What OKX's login answer means for the key and the clock; a refusal ends the link."""
        assert self._credentials is not None
        if isinstance(result, LoggedIn):
            log.info("ws_logged_in", extra={"conn": link.conn, "ws_name": self.name, "key": link.key_hint,
                                            "okx_conn_id": result.conn_id})
            self._credentials.record_auth_success()
            return
        self.counters.login_failures += 1
        if counts_against_key(result.code):
            # One count with REST's: past the threshold signed traffic pauses and an alert is logged. A timestamp
            # refusal (60006) is the clock's fault, not the key's: it resyncs below and is never counted.
            self._credentials.record_auth_failure(result.code or "?")
        what = f"login refused with {result.code} ({result.msg})"
        log.error("ws_login_refused", extra={"conn": link.conn, "ws_name": self.name, "code": result.code,
                                             "okx_msg": result.msg, "action": result.action.value,
                                             "key": link.key_hint})
        if result.action is LoginAction.FATAL:
            raise LinkFailure(what, LoginRejected(self.name, self.url, result.code, result.msg, link.key_hint))
        if result.action is LoginAction.RESYNC_CLOCK and self._resync_clock is not None:
            try:
                await self._resync_clock()
                log.info("ws_clock_resynced", extra={"conn": link.conn, "ws_name": self.name,
                                                     "offset_ms": self._clock.offset_ms})
            except Exception as exc:  # the retry will tell whether the clock is still off
                log.warning("ws_clock_resync_failed", extra={"conn": link.conn, "ws_name": self.name,
                                                             "error": f"{type(exc).__name__}: {exc}"})
        raise LinkFailure(what)
