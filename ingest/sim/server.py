"""SimServer: the OKX simulator on one port (WebSocket /ws/v5/{public,business,private} and REST /api/v5/...),
plus `main()` for `okx-ingest simulate`.

Manual mode (`auto_tick_s=None`, what tests use): nothing moves until `await sim.tick(n)`, which returns once
the resulting frames were written to the sockets. Automatic mode (the CLI and the demo): one task ticks every
`auto_tick_s`. Waits (`wait_subscribed`, `wait_logged_in`, ...) are event-driven, so tests never sleep.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import logging
import os
import secrets
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from aiohttp import web

from ingest.okx.channels import Endpoint, SubArg
from ingest.sim import frames
from ingest.sim.account import ScriptedAccount
from ingest.sim.clock import SimClock
from ingest.sim.config import SimConfig
from ingest.sim.faults import Faults, parse_endpoint
from ingest.sim.hub import ConnInfo, Hub
from ingest.sim.market import Market
from ingest.sim.rest import RestApi
from ingest.sim.scenario import ACTIONS, Scenario, ScenarioError, apply_config, load_scenario, run_scenario
from ingest.sim.stats import SimStats

T = TypeVar("T")
log = logging.getLogger("ingest.sim")
ArgMatch = SubArg | Mapping[str, str] | Callable[[SubArg], bool]


@dataclass(frozen=True, slots=True)
class PreparedTrades:
    """Trade frames generated (and logged, so REST already serves them) but not yet pushed: `pump` sends them."""

    inst_id: str
    trades: tuple[str, ...]
    trades_all: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.trades)


def _matcher(arg: ArgMatch) -> Callable[[SubArg], bool]:
    if isinstance(arg, SubArg):
        return arg.__eq__
    if callable(arg):
        return arg
    wanted = dict(arg)
    return lambda sub: all(sub.to_okx().get(k) == v for k, v in wanted.items())


class SimServer:
    """The simulator: `async with SimServer(config) as sim:` serves on `sim.port` until the block ends."""

    def __init__(self, config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or SimConfig()
        self.host = host
        self._port = port
        self.clock = SimClock(self.config.wall_ms)
        self.market = Market(self.config, self.clock)
        self.account = ScriptedAccount(self.config, self.market, self.clock)
        self.stats = SimStats()
        self.hub = Hub(self.config, self.clock, self.market, self.account, self.stats)
        self.faults: Faults = self.hub.faults
        self.rest = RestApi(self.hub)
        self._runner: web.AppRunner | None = None
        self._tick_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle -------------------------------------------------------------------------------------------
    def _app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_frame_bytes * 4)
        for endpoint in Endpoint:
            app.router.add_get(endpoint.value, self.hub.ws_handler)
        app.router.add_route("*", "/{tail:.*}", self.rest.handle)
        return app

    async def start(self) -> None:
        runner = web.AppRunner(self._app(), access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port)
        await site.start()
        self._runner = runner
        address = runner.addresses[0]
        self._port = int(address[1])
        if self.config.auto_tick_s is not None:
            self._spawn(self._auto_tick(self.config.auto_tick_s), "sim-auto-tick")
        log.info("okx simulator listening on %s", self.rest_base)

    async def stop(self) -> None:
        self.faults.rest_release()  # a held request must not keep the server's shutdown waiting
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.hub.close_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SimServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def _spawn(self, coro: object, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _auto_tick(self, interval: float) -> None:
        timer = self.hub.timer
        due = timer.now()
        while True:
            try:
                await self.tick(1)
            except Exception:
                log.exception("simulator tick failed")
            due += interval
            delay = due - timer.now()
            if delay < -10 * interval:  # far behind (a slow machine): skip ahead instead of bursting
                due = timer.now()
            await timer.sleep(delay)

    # --- addresses ---------------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    @property
    def ws_base(self) -> str:
        return f"ws://{self.host}:{self._port}"

    @property
    def rest_base(self) -> str:
        return f"http://{self.host}:{self._port}"

    def ws_url(self, endpoint: Endpoint | str) -> str:
        ep = parse_endpoint(endpoint)
        assert ep is not None
        return f"{self.ws_base}{ep.value}"

    # --- credentials -------------------------------------------------------------------------------------------
    def set_credentials(self, api_key: str, api_secret: str, passphrase: str) -> None:
        """Rotate the account's API key: from now on only the new key logs in and signs REST requests.

        Connections already logged in stay open (OKX closes them with 4007 only once the old key is deleted:
        `faults.revoke_login()`), so a client can switch over without a gap.
        """
        self.config = replace(self.config, api_key=api_key, api_secret=api_secret, passphrase=passphrase)
        self.hub.config = self.rest.config = self.account.config = self.config
        self.hub.watch.notify()

    # --- market time ------------------------------------------------------------------------------------------
    async def tick(self, n: int = 1) -> None:
        """Advance the market `n` steps and push the results; returns once written to every socket."""
        async with self._tick_lock:
            for i in range(n):
                self.hub.dispatch(self.market.step())
                if i % 64 == 63:
                    await self.hub.flush()
            await self.hub.flush()
        self.hub.watch.notify()

    def prepare_trades(self, inst_id: str, n: int) -> PreparedTrades:
        """Generate `n` trades of `inst_id` now (they enter the history REST serves) and render their `trades`
        and `trades-all` frames, ready for `pump`. The book is not touched."""
        m = self.market.get(inst_id)
        first = m.next_trade_id + 1
        agg = m.generate_trades(n, self.market.next_ts())
        lo = m.log.index_of_id(first)
        return PreparedTrades(inst_id, tuple(frames.trades(m, agg)), tuple(frames.trades_all(m, lo, len(m.log))))

    async def pump(self, prepared: PreparedTrades, batch: int = 5000) -> int:
        """Push prepared trade frames to every `trades`/`trades-all` subscriber as fast as the sockets take them;
        returns the number of frames queued."""
        hub = self.hub
        sent = 0
        for channel, batch_frames in (("trades", prepared.trades), ("trades-all", prepared.trades_all)):
            key = (channel, prepared.inst_id)
            for i in range(0, len(batch_frames), batch):
                sent += hub.deliver_many(key, batch_frames[i:i + batch], prepared.inst_id)
                await hub.flush()
        return sent

    async def liquidation_fill(self, inst_id: str, buy: bool = False) -> str:
        """A liquidation/ADL fill of `inst_id` now (negative tradeId), pushed on `trades` and `trades-all` and
        kept in the REST history at its time; returns its tradeId."""
        m = self.market.get(inst_id)
        trade = m.record_liquidation_fill(self.market.next_ts(), buy)
        self.hub.publish_trade(inst_id, trade)
        await self.hub.flush()
        return str(trade.trade_id)

    async def pump_trades(self, inst_id: str, n: int) -> int:
        """`prepare_trades` + `pump` in one call."""
        return await self.pump(self.prepare_trades(inst_id, n))

    async def flush(self) -> None:
        """Wait until everything queued so far was written to the sockets."""
        await self.hub.flush()

    # --- inspection and waits ------------------------------------------------------------------------------------
    def connections(self, endpoint: Endpoint | str | None = None, *, include_closed: bool = False) -> list[ConnInfo]:
        ep = parse_endpoint(endpoint)
        pool = self.hub.history if include_closed else self.hub.conns
        return [self.hub.info(c) for c in pool.values() if ep is None or c.endpoint is ep]

    def connection(self, conn_id: str) -> ConnInfo:
        return self.hub.info(self.hub.history[conn_id])

    async def wait_until(self, predicate: Callable[[], T | None], timeout: float | None = 5.0) -> T:  # noqa: ASYNC109
        """The first truthy `predicate()`, re-checked at every state change (connect, request, close, tick)."""
        return await self.hub.watch.wait_for(predicate, timeout)  # type: ignore[arg-type]

    async def wait_connections(self, count: int = 1, endpoint: Endpoint | str | None = None,
                               timeout: float = 5.0) -> list[str]:  # noqa: ASYNC109
        """Ids of open connections, once there are at least `count` (on `endpoint`)."""
        ep = parse_endpoint(endpoint)

        def check() -> list[str] | None:
            ids = [c.conn_id for c in self.hub.conns.values() if not c.closing and (ep is None or c.endpoint is ep)]
            return ids if len(ids) >= count else None

        return await self.hub.watch.wait_for(check, timeout)

    async def wait_subscribed(self, arg: ArgMatch, count: int = 1, endpoint: Endpoint | str | None = None,
                              timeout: float = 5.0) -> list[str]:  # noqa: ASYNC109
        """Ids of the connections holding a subscription matching `arg` (a SubArg, a subset of its OKX fields
        such as {"channel": "trades", "instId": "BTC-USDT"}, or a predicate), once at least `count` do."""
        match, ep = _matcher(arg), parse_endpoint(endpoint)

        def check() -> list[str] | None:
            ids = [c.conn_id for c in self.hub.conns.values()
                   if not c.closing and (ep is None or c.endpoint is ep) and any(match(s) for s in c.subs)]
            return ids if len(ids) >= count else None

        return await self.hub.watch.wait_for(check, timeout)

    async def wait_unsubscribed(self, arg: ArgMatch, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Return once no open connection holds a subscription matching `arg`."""
        match = _matcher(arg)
        await self.hub.watch.wait_for(
            lambda: not any(match(s) for c in self.hub.conns.values() if not c.closing for s in c.subs), timeout)

    async def wait_logged_in(self, count: int = 1, endpoint: Endpoint | str | None = None,
                             timeout: float = 5.0) -> list[str]:  # noqa: ASYNC109
        ep = parse_endpoint(endpoint)

        def check() -> list[str] | None:
            ids = [c.conn_id for c in self.hub.conns.values()
                   if c.logged_in and not c.closing and (ep is None or c.endpoint is ep)]
            return ids if len(ids) >= count else None

        return await self.hub.watch.wait_for(check, timeout)

    async def wait_closed(self, conn_id: str, timeout: float = 5.0) -> int | None:  # noqa: ASYNC109
        """The close code of connection `conn_id` once it is closed (1006 when aborted)."""
        conn = self.hub.history[conn_id]
        async with asyncio.timeout(timeout):
            return await conn.wait_closed()

    async def wait_rest(self, path: str, count: int = 1, timeout: float = 5.0) -> int:  # noqa: ASYNC109
        """Return once `path` received at least `count` REST requests in all (woken on each arrival, before the
        request is answered: a held or slow request counts at once)."""
        return await self.hub.watch.wait_for(
            lambda: self.stats.rest_requests[path] if self.stats.rest_requests[path] >= count else None, timeout)

    # --- scripting -------------------------------------------------------------------------------------------
    async def call(self, action: str, kwargs: Mapping[str, object]) -> object:
        """Run a scenario action such as "faults.drop" with keyword arguments (see `scenario.ACTIONS`)."""
        if action not in ACTIONS:
            raise ScenarioError(f"unknown action {action!r}; allowed: {sorted(ACTIONS)}")
        target_name, _, method = action.partition(".")
        targets: dict[str, object] = {"faults": self.faults, "market": self.market, "account": self.account,
                                      "sim": self}
        target = targets.get(target_name)
        func = getattr(target, method, None) if target is not None and not method.startswith("_") else None
        if func is None or not callable(func):
            raise ScenarioError(f"unknown action {action!r}")
        result = func(**kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def run_scenario(self, scenario: Scenario) -> None:
        """Run a scenario's steps against this server (its `config` part must be applied before creating it)."""
        await run_scenario(self, scenario)


# --- CLI -------------------------------------------------------------------------------------------------------
def _cli_config(args: argparse.Namespace, scenario: Scenario | None) -> tuple[SimConfig, bool]:
    env = os.environ
    key, secret, passphrase = env.get("OKX_API_KEY", ""), env.get("OKX_API_SECRET", ""), env.get(
        "OKX_API_PASSPHRASE", "")
    generated = not (key and secret and passphrase)
    if generated:
        # Throwaway credentials that only this simulator process accepts.
        key, secret, passphrase = secrets.token_hex(16), secrets.token_hex(32), secrets.token_hex(8)
    config = SimConfig(api_key=key, api_secret=secret, passphrase=passphrase, seed=args.seed,
                       auto_tick_s=args.tick_s, checksum=args.checksum)
    if args.instruments:
        config = replace(config, instruments=tuple(args.instruments.split(",")))
    if scenario is not None:
        config = apply_config(config, scenario.config)
    return config, generated


async def _serve(config: SimConfig, host: str, port: int, scenario: Scenario | None, generated: bool) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # non-Unix event loops
            loop.add_signal_handler(sig, stop.set)
    async with SimServer(config, host, port) as sim:
        print(f"okx simulator: REST {sim.rest_base}, WebSocket {sim.ws_base}/ws/v5/{{public,business,private}}",
              file=sys.stderr)
        if generated:
            print("simulator-only credentials (set OKX_API_KEY/SECRET/PASSPHRASE to choose them):\n"
                  f"  export OKX_API_KEY={config.api_key} OKX_API_SECRET={config.api_secret} "
                  f"OKX_API_PASSPHRASE={config.passphrase}", file=sys.stderr)
        if scenario is not None:
            sim._spawn(sim.run_scenario(scenario), "sim-scenario")
        await stop.wait()
    return 0


def port_number(value: str) -> int:
    """An argparse type: a TCP port, so `--port 99999` is a usage error rather than a traceback."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (0-65535)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535)")
    return port


def main(argv: Sequence[str] | None = None) -> int:
    """`okx-ingest simulate --host H --port N [--scenario FILE]`; credentials from OKX_API_KEY/SECRET/PASSPHRASE."""
    p = argparse.ArgumentParser(prog="okx-ingest simulate", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=8765)
    p.add_argument("--scenario", type=Path, default=None, help="JSON or TOML scenario file (see docs/SIMULATOR.md)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--instruments", default="", help="comma-separated instIds (default BTC-USDT,ETH-USDT,"
                                                     "BTC-USDT-SWAP)")
    p.add_argument("--tick-s", type=float, default=0.1, help="market step interval in seconds")
    p.add_argument("--checksum", action="store_true", help="real CRC32 book checksums instead of OKX's 0")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        scenario = load_scenario(args.scenario) if args.scenario else None
        config, generated = _cli_config(args, scenario)
        return asyncio.run(_serve(config, args.host, args.port, scenario, generated))
    except (ScenarioError, ValueError) as exc:
        print(f"okx-ingest simulate: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the listening socket: a port in use, an address not of this host
        print(f"okx-ingest simulate: --host {args.host} --port {args.port}: cannot listen there "
              f"({exc.strerror or exc}). Fix: choose a free port (0 picks one) or an address of this host",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
