"""The one owner of every task of the recorder: build from Settings, run, watch, shut down in order.

Start-up: embedded broker (if configured) -> credentials -> REST client and clock -> key permissions ->
Kafka sink, topics and delivery (journal recovered first) -> private reconciler (with `okx.private`) ->
pipeline -> WebSocket connections -> health.
Shutdown (SIGTERM/SIGINT): close the sockets after every received frame is queued, let the pipeline
publish all of it, flush delivery to Kafka (or leave it journaled), then stop the broker. SIGHUP re-reads
credentials. Any task that dies unexpectedly ends the process with a non-zero code so systemd or
Kubernetes restarts it; nothing fails silently.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.core import HistogramMetricFamily, Metric

from ingest import __version__
from ingest.config import Settings, require_cluster, require_subscriptions
from ingest.core.avro import RecordEncoder
from ingest.core.clock import ServerClock
from ingest.core.records import RECORD_TYPES, DeadLetterReason, GapKind, TopicKind, topic_name
from ingest.credentials import CredentialStore
from ingest.errors import IngestError
from ingest.io.broker import EmbeddedBroker
from ingest.io.cluster import GroupMembership
from ingest.io.delivery import Delivery
from ingest.io.handover import ControlChannel
from ingest.io.inbox import Inbox
from ingest.io.kafka import KafkaSink
from ingest.io.measured import MeasuredSink
from ingest.io.positions import PositionStore, PositionTail
from ingest.io.rest import OkxRestClient
from ingest.io.state import StreamStateFile
from ingest.io.ws_link import ConnState
from ingest.obs.health import HealthServer, Readiness
from ingest.obs.metrics import AckLatency, counter, gauge, new_component_registry
from ingest.obs.redact import REDACTOR
from ingest.okx.channels import SubArg
from ingest.runtime import (
    CANCEL_GRACE_S,
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_TASK_DIED,
    Runtime,
    bounded,
    finish_task,
    stop_task,
)
from ingest.services.clock import ClockService
from ingest.services.cluster import ClusterPositions, FencedOutlet, ShardConnections
from ingest.services.connections import ConnectionManager, subscription_arg
from ingest.services.copies import CopyArbiter
from ingest.services.handover import DURATION_BUCKETS, Handovers
from ingest.services.permissions import require_safe_key
from ingest.services.pipeline import Pipeline
from ingest.services.private import PrivateReconciler
from ingest.services.process import (
    configure_observability,
    credential_metrics,
    exit_code_for,
    install_signals,
    keep_credentials,
    key_verifier,
)

if TYPE_CHECKING:
    from ingest.services.archive import Archiver

log = logging.getLogger("ingest.supervisor")

#: Private args recorded when `okx.private = true` (fills needs VIP4+, so it is opt-in via subscriptions).
PRIVATE_ARGS: tuple[SubArg, ...] = (
    SubArg("orders", inst_type="ANY"),
    SubArg("positions", inst_type="ANY"),
    SubArg("account"),
    SubArg("balance_and_position"),
    SubArg("orders-algo", inst_type="ANY"),
)


#: Frames and link events between the sockets and the pipeline; small, because the delivery queue and the
#: journal behind the pipeline are where records wait, and a full inbox pauses the sockets (back-pressure).
INBOX_SIZE = 10_000
STATE_SAVE_INTERVAL_S = 5.0
#: Longest wait for the group consumer to close at shutdown (it sends no LeaveGroup: static membership).
MEMBERSHIP_STOP_S = 5.0


def wanted_args(settings: Settings) -> list[SubArg]:
    """Every arg this shard records: configured subscriptions, plus the private set when enabled."""
    args = [subscription_arg(s) for s in settings.okx.all_subscriptions()]
    if settings.okx.private:
        args += [a for a in PRIVATE_ARGS if a not in args]
    return args


def all_topics(prefix: str) -> list[str]:
    return [topic_name(prefix, kind) for kind in TopicKind]


@dataclass
class _Parts:
    """What a running daemon is made of (None until started)."""

    broker: EmbeddedBroker | None = None
    store: CredentialStore | None = None
    rest: OkxRestClient | None = None
    clock_service: ClockService | None = None
    delivery: Delivery | None = None
    pipeline: Pipeline | None = None
    reconciler: PrivateReconciler | None = None
    manager: ConnectionManager | ShardConnections | None = None
    membership: GroupMembership | None = None
    positions: ClusterPositions | None = None
    fence: FencedOutlet | None = None
    handovers: Handovers | None = None
    #: With cluster.copies > 1: the other copies' positions, and the gate of this pipeline's gaps.
    peers: PositionTail | None = None
    arbiter: CopyArbiter | None = None
    health: HealthServer | None = None
    state: StreamStateFile | None = None
    extra_tasks: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)


class Daemon:
    """One recorder process (one shard). `run(stop)` returns the exit code."""

    def __init__(self, settings: Settings, *, env: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self._env = env
        self.parts = _Parts()
        self.registry, self._collector = new_component_registry("recorder")
        self.ack_latency = AckLatency(self.registry)
        self._created_ns = time.time_ns()
        self.started = asyncio.Event()
        self.bootstrap_servers: str | None = None
        self._args = wanted_args(settings)
        self._archiver: Archiver | None = None
        self._archive_stop = asyncio.Event()
        self._archive_task: asyncio.Task[None] | None = None

    # ---- start-up -------------------------------------------------------------------------------------

    def _needs_credentials(self) -> bool:
        return self.settings.okx.private or any(a.needs_login for a in self._args)

    async def _start_broker(self) -> str:
        kafka = self.settings.kafka
        if not kafka.embedded:
            return kafka.bootstrap_servers
        broker = EmbeddedBroker(port=kafka.embedded_port)
        await broker.start()
        self.parts.broker = broker
        log.warning("embedded_broker_started", extra={
            "bootstrap": broker.bootstrap_servers,
            "note": "memory only: everything recorded is lost when the process stops; "
                    "set kafka.bootstrap_servers to a real Kafka for production"})
        return broker.bootstrap_servers

    def _start_credentials(self) -> CredentialStore | None:
        if not self._needs_credentials():
            return None
        store = CredentialStore.from_settings(self.settings.okx, env=self._env)
        REDACTOR.set_secrets(store.current().values())
        log.info("credentials_loaded", extra={"key": store.current().key_hint})
        return store

    async def _start(self) -> None:
        s = self.settings
        p = self.parts
        require_subscriptions(s)  # nothing to record is a configuration error (exit 2), not a task that ends
        member = require_cluster(s, self._env if self._env is not None else os.environ)
        #: Journal and state are per replica: the shard setting, or in cluster mode the member name.
        replica = member or s.shard
        self.bootstrap_servers = await self._start_broker()
        p.store = self._start_credentials()
        clock = ServerClock(lambda: time.time_ns() // 1_000_000)
        p.rest = OkxRestClient.from_settings(s, clock, p.store)
        p.clock_service = ClockService.from_settings(p.rest, clock, s.obs)
        p.rest.on_clock_expired = p.clock_service.resync
        try:
            await p.clock_service.measure()
        except IngestError as exc:
            log.warning("clock_unmeasured", extra={"error": str(exc), "note": "retrying in the background"})
        if p.store is not None:  # refuse an over-privileged key before anything logs in with it
            await require_safe_key(p.rest, s.okx)

        encoder = RecordEncoder(s.kafka.topic_prefix)
        if s.kafka.schema_registry_url:
            encoder = RecordEncoder(s.kafka.topic_prefix, schema_ids=await _register_schemas(s, encoder))
        sink = KafkaSink(s.kafka, bootstrap_servers=self.bootstrap_servers, topics=all_topics(s.kafka.topic_prefix))
        # The journal is per shard: replicas sharing a volume never replay each other's records.
        journal = s.journal.model_copy(update={"dir": s.journal.dir / replica})
        p.delivery = Delivery.from_settings(MeasuredSink(sink, self.ack_latency), journal, s.kafka)
        await p.delivery.start()

        inbox = Inbox(INBOX_SIZE)
        if member is None:
            p.manager = ConnectionManager(s.okx, s.ws, inbox, credentials=p.store, clock=clock,
                                          resync_clock=p.clock_service.resync, args=self._args)
        else:
            copy = s.cluster.copy_of(member)
            p.manager = ShardConnections(s.okx, s.ws, inbox, self._args, s.cluster.shards, credentials=p.store,
                                         clock=clock, resync_clock=p.clock_service.resync, member=member,
                                         copy=copy if s.cluster.copies > 1 else None)
            p.membership = GroupMembership(s.cluster, s.kafka, member, p.manager.apply,
                                           bootstrap_servers=self.bootstrap_servers, copy=copy)
            await p.membership.ensure_topic()
        if s.okx.private and p.store is not None:
            # Reads the account over REST after every private (re)connect; results enter the same queue.
            p.reconciler = PrivateReconciler(p.rest, clock, inbox)
        outlet: Delivery | FencedOutlet = p.delivery
        if isinstance(p.manager, ShardConnections) and p.membership is not None:
            outlet = p.fence = FencedOutlet(p.delivery, p.manager, p.membership.lease,
                                            topic_name(s.kafka.topic_prefix, TopicKind.GAPS))
            if s.cluster.handover_timeout_s > 0:
                channel = ControlChannel(s.kafka, bootstrap_servers=self.bootstrap_servers,
                                         client_id=f"{s.kafka.client_id}-{member}-handover",
                                         topic=p.membership.topic)
                await channel.start()
                p.handovers = Handovers(channel, p.manager.member, p.manager.by_shard, s.cluster.handover_timeout_s,
                                        topic_name(s.kafka.topic_prefix, TopicKind.GAPS))
                p.handovers.deliver = p.fence.deliver
                p.handovers.on_released = p.manager.wake
                p.handovers.is_live = p.manager.shard_live
                p.manager.handovers = p.handovers
        p.pipeline = Pipeline(inbox, outlet, encoder, resubscriber=p.manager, reconciler=p.reconciler,
                              shard=replica, publish_raw=s.kafka.publish_raw, max_record_bytes=s.kafka.max_record_bytes,
                              latency=self.ack_latency, book_checkpoint_s=s.okx.book_checkpoint_s)
        if isinstance(p.manager, ShardConnections) and member is not None:
            store = PositionStore(s.kafka, bootstrap_servers=self.bootstrap_servers,
                                  client_id=f"{s.kafka.client_id}-{member}-positions")
            await store.start()
            if p.manager.copy is not None:
                p.peers = PositionTail(s.kafka, p.manager.copy, bootstrap_servers=self.bootstrap_servers,
                                       client_id=f"{s.kafka.client_id}-{member}-copies")
                await p.peers.start()
                p.arbiter = CopyArbiter(p.peers, inbox, s.cluster.copy_gap_wait_s)
                p.pipeline.gap_gate = p.arbiter.offer
            p.positions = ClusterPositions(p.pipeline, p.delivery, store, p.manager, member,
                                           s.cluster.position_interval_s,
                                           p.membership.lease if p.membership is not None else None,
                                           fence=p.fence, arbiter=p.arbiter)
        # Where the previous process of this shard left each stream: the time nobody recorded becomes gaps.
        p.state = StreamStateFile(s.journal.dir / f"{replica}.streams.json")
        saved = p.state.load() if member is None else None  # in cluster mode, positions live in Kafka
        if saved is not None:
            restored = p.pipeline.restore(saved, self._args)
            log.info("stream_state_restored", extra={"streams": restored, "saved_at_ns": saved.saved_ts_ns})
        self._register_metrics()
        await self._start_archive()
        p.health = HealthServer(self.registry, self.readiness, s.obs.metrics_host, s.obs.metrics_port)
        await p.health.start()

    # ---- running --------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        """Start, run until `stop` is set or a task dies, shut down in order; the exit code."""
        reload = asyncio.Event()
        remove_signals = install_signals(stop, reload)  # before start-up: a SIGTERM then still cleans up
        try:
            return await self._run(stop, reload)
        finally:
            remove_signals()

    async def _run(self, stop: asyncio.Event, reload: asyncio.Event) -> int:
        starting = asyncio.create_task(self._start(), name="start")
        stopper = asyncio.create_task(stop.wait(), name="stop")
        try:
            try:
                await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                await stop_task(stopper, what="stop")
            if not starting.done():  # asked to stop while still starting (e.g. waiting for OKX to answer)
                await stop_task(starting, self.settings.journal.close_timeout_s, what="start-up")
                await self._release()
                log.info("daemon_stopped", extra={"exit_code": EXIT_OK, "during": "start-up"})
                return EXIT_OK
            starting.result()
        except IngestError as exc:
            log.error("startup_failed", extra={"error": str(exc)})
            await self._release()
            return EXIT_CONFIG
        except BaseException:
            # Anything else (a port in use, a bug): never leave the embedded broker or the journal behind.
            if not starting.done():
                await stop_task(starting, what="start-up")
            await self._release()
            raise
        p = self.parts
        assert p.manager is not None and p.pipeline is not None and p.clock_service is not None
        runtime = Runtime("recorder", stop_timeout_s=self.settings.journal.close_timeout_s)
        code = EXIT_TASK_DIED
        try:
            runtime.spawn("pipeline", p.pipeline.run(), essential=True)
            runtime.spawn("connections", p.manager.run(), essential=True)
            if p.membership is not None:
                runtime.spawn("membership", p.membership.run(), essential=True)
            if p.handovers is not None:
                runtime.spawn("handover", p.handovers.run(), essential=True)
            if p.peers is not None and p.arbiter is not None:
                # Not essential: without the other copies' positions every gap is raised after its wait (safe).
                runtime.spawn("copy-positions", p.peers.run())
                runtime.spawn("copy-arbiter", p.arbiter.run(), essential=True)
            runtime.spawn("clock", p.clock_service.run())
            if p.reconciler is not None:
                runtime.spawn("reconciler", p.reconciler.run())
            if p.positions is None:
                runtime.spawn("state", self._save_state_loop())
            else:
                runtime.spawn("positions", p.positions.run())
            if p.broker is not None:
                runtime.spawn("embedded-broker", self._broker_loop(p.broker))
            if p.store is not None:
                assert p.rest is not None
                verify = key_verifier(self.settings, p.rest.clock)  # a rotated key is checked before any use
                runtime.spawn("credentials",
                              keep_credentials(p.store, self.settings.okx.credential_poll_s, reload, verify=verify))
            for i, extra in enumerate(p.extra_tasks):
                runtime.spawn(f"extra-{i}", extra())
            log.info("daemon_started", extra={"shard": self.settings.shard, "version": __version__,
                                              "connections": len(p.manager.connections),
                                              "subscriptions": len(self._args), "kafka": self.bootstrap_servers})
            self.started.set()
            ended = await runtime.wait(stop)
            # A refused rotated key (or another configuration error) is exit 2, as at start-up.
            code = ended.exit_code if ended.error is None else exit_code_for(ended.error)
        finally:
            # Whatever ended the run (a stop, a dead task, an exception here), the shutdown runs, bounded.
            await self._shutdown(runtime)
        log.info("daemon_stopped", extra={"exit_code": code})
        return code

    async def _shutdown(self, runtime: Runtime) -> None:
        """Stop in data order, every step bounded: a stop never hangs, whatever Kafka or OKX do."""
        p = self.parts
        assert p.pipeline is not None and p.delivery is not None
        budget = self.settings.journal.close_timeout_s
        ws_budget = self.settings.ws.shutdown_timeout_s + CANCEL_GRACE_S
        # 0. No new assignment starts connections from here on (a static member does not leave the group: a
        # restart within the session timeout gets its shards back). A dynamic member leaves, so its shards move
        # now: it says so on their control partitions first and keeps recording them until they are handed over.
        leaving = (p.handovers is not None and isinstance(p.manager, ShardConnections)
                   and not self.settings.cluster.static_membership)
        if leaving and isinstance(p.manager, ShardConnections):
            await bounded(p.manager.leave(), budget, what="announcing the hand-over")
        await runtime.stop("membership", MEMBERSHIP_STOP_S)
        if leaving and p.handovers is not None:
            # Not shorter than a release: it waits up to twice the timeout for the new owner's `prepared`.
            await p.handovers.wait_released(2 * self.settings.cluster.handover_timeout_s + 1)
        await runtime.stop("handover")
        # 1. Sockets: the connection manager closes them after every received frame is in the queue.
        await runtime.stop("connections", ws_budget)
        # The reconciler next: a read it finishes now still reaches the queue before the drain below.
        await runtime.stop("reconciler")
        # 2. The pipeline publishes everything queued (it keeps running while we wait for it).
        pipeline_task = runtime.pop("pipeline")
        if pipeline_task is not None and not pipeline_task.done():
            try:
                async with asyncio.timeout(budget):
                    await p.pipeline.inbox.join()
            except TimeoutError:
                log.error("pipeline_drain_timeout", extra={"left": p.pipeline.inbox.qsize()})
        if p.arbiter is not None:
            # Gaps still held for another copy's positions: published now (the pipeline still runs).
            await runtime.stop("copy-arbiter")
            await p.arbiter.flush(budget)
            await runtime.stop("copy-positions")
        if pipeline_task is not None:
            await stop_task(pipeline_task, what="pipeline")
        # Expected on a planned stop: the sockets are closed, so every stream has an open gap; it is saved and
        # the next start of this shard closes it with its first record (and the backfill fills it).
        log.info("streams_open_at_shutdown", extra={"count": len(p.pipeline.open_gaps())})
        await runtime.stop("state")
        await runtime.stop("positions")
        if p.positions is None:
            await bounded(self._save_state(), budget, what="saving stream state")
        else:  # the last acknowledged positions, for whoever records these shards next (this replica restarted)
            await bounded(p.positions.save(), budget, what="saving stream positions")
        await runtime.close(CANCEL_GRACE_S)
        # 3. Delivery: flush to Kafka, or leave the rest journaled for the next start (close is bounded).
        await p.delivery.close()
        log.info("delivery_closed", extra={"records_in": p.delivery.stats.records_in,
                                           "records_out": p.delivery.stats.records_out,
                                           "left_journaled": p.delivery.stats.journal_records})
        await self._stop_archive()
        await self._release()

    # ---- the in-process archiver (embedded broker only) ----------------------------------------------

    async def _start_archive(self) -> None:
        """With the embedded broker nothing survives the process, so the recorder archives what it records
        (`archive.embedded`): the two-command default leaves queryable files in `archive.url`."""
        s = self.settings
        if not (s.kafka.embedded and s.archive.embedded):
            return
        from ingest.services.archive import Archiver, open_store, query_hint

        store = await asyncio.to_thread(open_store, s.archive)
        self._archive_stop = asyncio.Event()
        # The embedded broker starts empty, offsets from 0: file names carry which broker they came from.
        archiver = Archiver(s, store, bootstrap_servers=self.bootstrap_servers, incarnation=str(time.time_ns()))
        if self._archive_task is None:  # once: the metrics follow whichever archiver runs
            self._collector.add(lambda: self._archiver.metrics() if self._archiver is not None else [])
        self._archiver = archiver
        self._archive_task = asyncio.create_task(archiver.run(self._archive_stop), name="archive")
        log.warning("archive_in_process", extra={"where": store.root, "query": query_hint(store),
                                                 "note": "the embedded broker keeps nothing; these files do"})

    async def _stop_archive(self, *, catch_up: bool = True) -> None:
        """Archive everything the broker holds, then drain and stop (bounded by archive.drain_timeout_s)."""
        archiver = self._archiver
        if archiver is None or self._archive_task is None:
            return
        timeout = self.settings.archive.drain_timeout_s
        if catch_up:
            try:
                async with asyncio.timeout(timeout):
                    await archiver.caught_up()
            except TimeoutError:
                log.error("archive_catch_up_timeout", extra={"timeout_s": timeout})
        self._archive_stop.set()
        # Its own drain is bounded by `timeout`, its consumer by 10 s; past that it is stopped (bounded too).
        await finish_task(self._archive_task, timeout + 12, what="archive")
        self._archiver = None

    async def _release(self) -> None:
        """Release what start-up acquired (each step is idempotent, so it is safe after a partial start)."""
        p = self.parts
        if self._archiver is not None:
            await self._stop_archive()
        if p.health is not None:
            await p.health.stop()
        if p.delivery is not None:
            await p.delivery.close()  # idempotent
        if p.positions is not None:
            await p.positions.store.close()
        if p.handovers is not None:
            await p.handovers.channel.close()
        if p.peers is not None:
            await p.peers.close()
        if p.rest is not None:
            await p.rest.aclose()
        if p.broker is not None:
            await p.broker.stop()

    async def _save_state(self) -> None:
        """Save stream positions, but only positions whose records are journaled: a position saved ahead of
        its records would hide the records a SIGKILL lost from the gap the next start reports."""
        p = self.parts
        if p.state is None or p.pipeline is None or p.delivery is None:
            return
        await p.pipeline.between_batches()
        streams, private_last_ns = p.pipeline.checkpoint()  # no await since: it matches what delivery holds
        saved_at, accepted = time.time_ns(), p.delivery.stats.records_in
        await p.delivery.wait_for(lambda d: d.records_in - d.queued >= accepted or d.failed)
        if p.delivery.stats.failed:
            return
        await asyncio.to_thread(p.state.save, saved_at, streams, private_last_ns)

    async def _save_state_guarded(self) -> None:
        """`_save_state` that never raises: a state it cannot save costs the next start's downtime report, never
        the recording (the shutdown's save is bounded by `runtime.bounded`, which never raises either)."""
        try:
            await self._save_state()
        except Exception as exc:
            log.error("stream_state_not_saved", extra={"error": f"{type(exc).__name__}: {exc}"[:500]}, exc_info=exc)

    async def _save_state_loop(self) -> None:
        """Save stream positions every few seconds, so even a SIGKILL leaves a recent state behind."""
        while True:
            await asyncio.sleep(STATE_SAVE_INTERVAL_S)  # a periodic timer, not synchronisation
            await self._save_state_guarded()

    async def _broker_loop(self, broker: EmbeddedBroker) -> None:
        """Supervise the embedded broker: if it dies, start it again on the same port (it comes back empty;
        delivery re-creates the topics and resends from the journal what it had not acknowledged)."""
        while True:
            code = await broker.wait()
            log.error("embedded_broker_died", extra={"exit_code": code, "action": "restarting it (memory only: "
                                                     "what it held is gone; unacknowledged records are resent)"})
            await broker.start()
            if self._archiver is not None:  # a new, empty broker: a new archiver for its offsets
                await self._stop_archive(catch_up=False)
                await self._start_archive()

    # ---- health and metrics ---------------------------------------------------------------------------

    def readiness(self) -> Readiness:
        """Ready when data flows end to end; otherwise the reasons, for the operator."""
        p = self.parts
        reasons: list[str] = []
        details: dict[str, object] = {}
        if p.manager is not None:
            status = p.manager.status()
            details["connections_live"] = status.live
            details["connections"] = {c.name: c.state.value for c in status.connections}
            if status.live < len(status.connections):
                reasons.append(f"{len(status.connections) - status.live} of {len(status.connections)} "
                               "connections not live")
            if status.stopped:
                reasons.append(f"connections stopped for good: {status.stopped}")
            refused = {arg: code for c in status.connections for arg, code in c.failed.items()}
            if refused:
                details["subscriptions_refused"] = refused
                reasons.append(f"{len(refused)} subscriptions refused by OKX (see subscriptions_refused)")
        if p.membership is not None:
            owned = p.membership.current
            details["cluster"] = {"member": p.membership.member, "generation": owned.generation if owned else None,
                                  "shards_owned": sorted(owned.shards) if owned else []}
            if p.arbiter is not None:
                details["cluster"]["copy"] = {  # type: ignore[index]
                    "copy": p.membership.copy, "group": p.membership.group_id, "gaps_held": p.arbiter.held,
                    "gaps_covered": p.arbiter.covered, "gaps_raised": p.arbiter.raised}
            if p.handovers is not None:
                details["cluster"]["handovers"] = {  # type: ignore[index]
                    "preparing": sorted(p.handovers.holding), "releasing": sorted(p.handovers.releasing),
                    **p.handovers.stats.results}
            if owned is None:
                reasons.append("cluster: no shard assignment yet (joining the group)")
        if self.settings.kafka.embedded:
            # Ready (data flows), but say so: nothing recorded survives the process.
            details["kafka"] = "embedded (memory only: everything recorded is lost when the process stops)"
        if p.delivery is not None:
            d = p.delivery.stats
            details["journal_records"] = d.journal_records
            if d.failed:
                reasons.append(f"delivery failed: {d.last_error}")
            elif not d.broker_up:
                reasons.append("Kafka unreachable: recording to the journal")
            if d.journal_full:
                reasons.append("journal full: back-pressure on the sockets")
        if p.pipeline is not None:
            lag = p.pipeline.lag_s()
            details["pipeline_lag_s"] = round(lag, 3)
            limit = self.settings.obs.max_pipeline_lag_s
            if lag > limit:
                reasons.append(f"pipeline lag {lag:.1f} s above obs.max_pipeline_lag_s ({limit:g} s): received "
                               "frames wait to be recorded (delivery holds the pipeline, or the core does not keep "
                               "up: record fewer instruments per shard)")
        if p.clock_service is not None and p.clock_service.health().value == "fail":
            reasons.append("clock offset to OKX above the limit: logins and signed requests fail (fix NTP)")
        return Readiness(not reasons and p.manager is not None, tuple(reasons), details)

    def _register_metrics(self) -> None:
        self._collector.add(self._pipeline_metrics)
        self._collector.add(self._connection_metrics)
        self._collector.add(self._delivery_metrics)
        self._collector.add(self._rest_metrics)
        self._collector.add(self._private_metrics)
        self._collector.add(self._stream_metrics)
        self._collector.add(self._cluster_metrics)

    def _pipeline_metrics(self) -> Iterable[Metric]:
        p = self.parts.pipeline
        if p is None:
            return []
        st = p.stats
        frames = counter("frames", "Frames received from OKX and processed")
        frames.add_metric([], st.frames)
        # Every known label value from the first scrape on: rate() and alerts see a series go 0 -> 1.
        records = counter("records", "Records produced, by topic kind", ("topic",))
        for topic, n in _with_zeros(st.records, TopicKind).items():
            records.add_metric([topic], n)
        dead = counter("dead_letters", "Frames that could not become records, by reason", ("reason",))
        for reason, n in _with_zeros(st.dead_letters, DeadLetterReason).items():
            dead.add_metric([reason], n)
        gaps = counter("gaps", "Gaps detected (opened), by kind", ("kind",))
        for kind, n in _with_zeros(st.gaps, GapKind).items():
            gaps.add_metric([kind], n)
        okx_errors = counter("okx_errors", "Error events OKX sent, by code", ("code",))
        for code, n in st.okx_errors.items():
            okx_errors.add_metric([code], n)
        book = counter("book_events", "Order-book integrity events", ("event",))
        book.add_metric(["reset"], st.book_resets)
        book.add_metric(["break"], st.book_breaks)
        book.add_metric(["delta_dropped"], st.book_deltas_dropped)
        book.add_metric(["resubscribe_requested"], st.resubscribes_requested)
        book.add_metric(["checkpoint"], st.book_checkpoints)
        dups = counter("duplicates_dropped", "Duplicates dropped, by cause", ("cause",))
        dups.add_metric(["connection_overlap"], st.overlap_duplicates_dropped)
        dups.add_metric(["private_repeat"], st.private_repeats_dropped)
        dups.add_metric(["private_already_recorded"], st.rest_rows_dropped)
        events = counter("okx_events", "Event messages OKX sent (login, subscribe, channel-conn-count, ...)",
                         ("event",))
        for event, n in st.events.items():
            events.add_metric([event], n)
        inbox = gauge("inbox_depth", "Frames and events waiting for the pipeline")
        inbox.add_metric([], p.inbox.qsize())
        lag = gauge("pipeline_lag_seconds",
                    "Age of the oldest frame or event received and not yet processed by the pipeline (0 when none)")
        lag.add_metric([], p.lag_s())
        busy = counter("pipeline_busy_seconds", "Time the pipeline spent on batches rather than waiting for input "
                       "(rate near 1: the core is saturated, the backlog waits in the sockets)")
        busy.add_metric([], st.busy_s)
        state = gauge("pipeline_state_entries", "Entries of each per-stream map of the pipeline (all bounded)",
                      ("map",))
        for name, n in p.state_sizes().items():
            state.add_metric([name], n)
        failures = counter("pipeline_failures", "Items the data path's last-resort guard caught, by stage",
                           ("stage",))
        failures.add_metric(["item"], st.item_failures)
        failures.add_metric(["encode"], st.unencodable_records)
        failures.add_metric(["stream_limit"], st.streams_refused)
        return [frames, records, dead, gaps, okx_errors, events, book, dups, inbox, lag, busy, state, failures]

    def _cluster_metrics(self) -> Iterable[Metric]:
        """Cluster mode: what this replica owns, in which generation, and what its fence and positions did."""
        p = self.parts
        m, shards = p.membership, p.manager
        if m is None or not isinstance(shards, ShardConnections):
            return []
        owned = gauge("cluster_shards_owned", "Shards this replica records")
        owned.add_metric([], len(shards.owned))
        generation = gauge("cluster_generation", "Consumer-group generation of this replica's assignment")
        generation.add_metric([], m.current.generation if m.current is not None else -1)
        rebalances = counter("cluster_rebalances", "Assignments received (each rebalance of the group)")
        rebalances.add_metric([], m.rebalances)
        lease = gauge("cluster_lease_valid", "1 while this replica's session lease holds (else it publishes nothing)")
        lease.add_metric([], int(m.lease.valid()))
        out: list[Metric] = [owned, generation, rebalances, lease]
        if p.fence is not None:
            fenced = counter("cluster_fenced_records", "Records dropped because this replica no longer owned them")
            fenced.add_metric([], p.fence.fenced)
            held = gauge("cluster_held_records", "Records of owned shards held while the lease is expired (published "
                         "if the next assignment keeps the shard)")
            held.add_metric([], p.fence.held)
            out += [fenced, held]
        if p.positions is not None:
            written = counter("cluster_positions_written", "Stream positions written to <prefix>positions")
            written.add_metric([], p.positions.store.written)
            restored = counter("cluster_positions_restored", "Streams continued from another owner's position")
            restored.add_metric([], p.positions.restored)
            out += [written, restored]
        h = p.handovers
        if h is not None:
            results = counter("cluster_handovers", "Planned hand-overs by result: completed / fallback (as the new "
                              "owner: no released record in time, a takeover), released / release_timeout / "
                              "release_preempted (as the old owner)", ("result",))
            for result, n in h.stats.results.items():
                results.add_metric([result], n)
            buckets = [(str(b), sum(1 for d in h.stats.durations if d <= b)) for b in DURATION_BUCKETS]
            duration = HistogramMetricFamily(
                "okx_ingest_cluster_handover_seconds", "Completed hand-overs, from the new owner's subscriptions "
                "being live to the old owner's released record", buckets=[*buckets, ("+Inf", len(h.stats.durations))],
                sum_value=sum(h.stats.durations))
            in_progress = gauge("cluster_handovers_in_progress", "Shards being handed over, by side", ("side",))
            in_progress.add_metric(["preparing"], len(h.holds))
            in_progress.add_metric(["releasing"], len(h.releases))
            out += [results, duration, in_progress]
        a = p.arbiter
        if a is not None:
            copy = gauge("cluster_copy", "Which copy this replica records (cluster.copies > 1)")
            copy.add_metric([], m.copy)
            gaps = counter("cluster_copy_gaps", "Gaps this copy detected, by outcome: covered (another copy recorded "
                           "the window: not raised) / raised (published for the backfill)", ("outcome",))
            gaps.add_metric(["covered"], a.covered)
            gaps.add_metric(["raised"], a.raised)
            held = gauge("cluster_copy_gaps_held", "Gaps waiting for another copy's positions (at most "
                         "cluster.copy_gap_wait_s)")
            held.add_metric([], a.held)
            out += [copy, gaps, held]
        return out

    def _connection_metrics(self) -> Iterable[Metric]:
        m = self.parts.manager
        if m is None:
            return []
        status = m.status()
        state = gauge("ws_connection_state", "1 for the state each connection is in", ("conn", "state"))
        counters = {
            "connects": counter("ws_connects", "WebSocket connects", ("conn",)),
            "disconnects": counter("ws_disconnects", "WebSocket disconnects", ("conn",)),
            "pong_timeouts": counter("ws_pong_timeouts", "Missing pongs that forced a reconnect", ("conn",)),
            "login_failures": counter("ws_login_failures", "Failed logins (auth failures)", ("conn",)),
            "subscribe_failures": counter("ws_subscribe_failures", "Args OKX refused", ("conn",)),
            "resubscribes": counter("ws_resubscribes", "Single-arg resubscribes (book resyncs)", ("conn",)),
            "notices": counter("ws_notices", "64008 service-upgrade notices", ("conn",)),
            "requests": counter("ws_requests", "login/subscribe/unsubscribe requests sent", ("conn",)),
        }
        budget = gauge("ws_request_budget_remaining", "Requests left in the 480/hour window", ("conn",))
        for c in status.connections:
            for known in ConnState:
                state.add_metric([c.name, known.value], int(known is c.state))
            for attr, family in counters.items():
                family.add_metric([c.name], getattr(c.counters, attr))
            if c.budget_remaining is not None:
                budget.add_metric([c.name], c.budget_remaining)
        live = gauge("ws_connections_live", "Connections live")
        live.add_metric([], status.live)
        return [state, *counters.values(), budget, live]

    def _delivery_metrics(self) -> Iterable[Metric]:
        d = self.parts.delivery
        if d is None:
            return []
        st = d.stats
        out = counter("delivered_records", "Records acknowledged by Kafka")
        out.add_metric([], st.records_out)
        queued = gauge("delivery_queued", "Records in memory waiting for the journal")
        queued.add_metric([], st.queued)
        jr = gauge("journal_records", "Records journaled and not yet acknowledged by Kafka")
        jr.add_metric([], st.journal_records)
        jb = gauge("journal_bytes", "Journal segment bytes on disk")
        jb.add_metric([], st.journal_bytes)
        jmax = gauge("journal_max_bytes", "journal.max_bytes: the size at which back-pressure starts")
        jmax.add_metric([], d.journal.max_bytes)
        full = gauge("journal_full", "1 while the journal is full (back-pressure)")
        full.add_metric([], int(st.journal_full))
        up = gauge("broker_up", "1 while Kafka accepts writes")
        up.add_metric([], int(st.broker_up))
        errors = counter("delivery_errors", "Failed Kafka writes (retried unless permanent)")
        errors.add_metric([], st.delivery_errors)
        lag = gauge("delivery_lag_seconds", "Age of the oldest record not yet acknowledged by Kafka")
        lag.add_metric([], st.drain_lag_s())
        return [out, queued, jr, jb, jmax, full, up, errors, lag]

    def _rest_metrics(self) -> Iterable[Metric]:
        p = self.parts
        out: list[Metric] = []
        if p.rest is not None:
            st = p.rest.stats()
            req = counter("rest_requests", "REST requests by endpoint and OKX code", ("endpoint", "code"))
            for (path, code), n in st.requests.items():
                req.add_metric([path, code], n)
            wait = counter("rest_limiter_wait_seconds", "Time spent waiting for rate-limit slots", ("endpoint",))
            for path, s in st.limiter_wait_s.items():
                wait.add_metric([path], s)
            breaker = gauge("rest_breaker_open", "1 while an endpoint's circuit breaker is open", ("endpoint",))
            for path, state in st.breakers.items():
                breaker.add_metric([path], int(state.value != "closed"))
            out += [req, wait, breaker]
        if p.clock_service is not None:
            cs = p.clock_service.status()
            off = gauge("clock_offset_seconds", "OKX server time minus local time")
            off.add_metric([], cs.offset_ms / 1000)
            out.append(off)
        auth = counter("auth_failures", "Failed authentications against OKX")
        auth.add_metric([], p.store.auth.status().failures_total if p.store is not None else 0)
        out += [auth, *credential_metrics(p.store)]
        return out

    def _private_metrics(self) -> Iterable[Metric]:
        p = self.parts
        if p.reconciler is None or p.pipeline is None:
            return []
        rs, st = p.reconciler.stats, p.pipeline.stats
        reads = counter("private_reconcile_reads", "REST reads of the private account after a hole, by outcome",
                        ("outcome",))
        reads.add_metric(["ok"], rs.reads)
        reads.add_metric(["failed"], rs.failures)
        rows = counter("private_reconcile_rows", "Rows those reads returned, by kind", ("kind",))
        for kind, n in rs.rows.items():
            rows.add_metric([kind], n)
        published = counter("private_reconcile_records", "Records the reads added to the record (source=rest)",
                            ("topic",))
        for topic, n in st.rest_records.items():
            published.add_metric([topic], n)
        pending = gauge("private_reconcile_pending", "1 while a requested read is waiting or running")
        pending.add_metric([], int(p.reconciler.pending))
        return [reads, rows, published, pending]

    def _stream_metrics(self) -> Iterable[Metric]:
        """Per subscribed stream: age of its last data push; open gaps. Labels come from the configured
        subscriptions only, so the series set is bounded by the config, not by what OKX sends."""
        p = self.parts.pipeline
        if p is None:
            return []
        now = time.time_ns()
        age = gauge("stream_last_message_age_seconds",
                    "Seconds since the stream's last data push (since start while none arrived)", ("channel", "inst"))
        last = p.stream_last_ns
        for arg in self._args:
            age.add_metric([arg.channel, _inst_label(arg)], max(0.0, (now - last.get(arg, self._created_ns)) / 1e9))
        gaps = p.open_gaps()
        open_now = gauge("gaps_open", "Streams whose gap is still open (the stream has not resumed)")
        open_now.add_metric([], len(gaps))
        oldest = gauge("gap_oldest_open_seconds", "Age of the oldest gap still open (0 when none)")
        oldest.add_metric([], max((max(0.0, (now - g.opened_ts_ns) / 1e9) for g in gaps), default=0.0))
        embedded = gauge("kafka_embedded", "1 while recording into the embedded memory-only broker")
        embedded.add_metric([], int(self.settings.kafka.embedded))
        return [age, open_now, oldest, embedded]


def _inst_label(arg: SubArg) -> str:
    """The `inst` label of a stream: its instId, else instType / instFamily / ccy (empty for account-wide)."""
    return arg.inst_id or arg.inst_type or arg.inst_family or arg.ccy or ""


def _with_zeros(counts: Mapping[str, int], known: Iterable[enum.StrEnum]) -> dict[str, int]:
    """`counts` with every known label value present (0 when never counted)."""
    out = dict.fromkeys((k.value for k in known), 0)
    out.update(counts)
    return out


async def _register_schemas(settings: Settings, encoder: RecordEncoder) -> dict[str, int]:
    """Register every record schema under `<topic>-value` and return full name -> Schema Registry id."""
    import orjson

    from ingest.io.registry import SchemaRegistry

    assert settings.kafka.schema_registry_url is not None
    prefix = settings.kafka.topic_prefix
    async with SchemaRegistry.from_settings(settings.kafka) as registry:
        return {
            cls.AVRO_NAME: await registry.schema_id(
                topic_name(prefix, cls.TOPIC), orjson.dumps(encoder.schemas[cls.AVRO_NAME].source).decode())
            for cls in RECORD_TYPES
        }


async def run_daemon(settings: Settings) -> int:
    """`okx-ingest run`: the recorder until SIGTERM/SIGINT."""
    configure_observability(settings)
    return await Daemon(settings).run(asyncio.Event())
