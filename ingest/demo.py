"""`okx-ingest demo` (`make demo`): the whole product offline, in one process.

The OKX simulator (ticking by itself, with a scripted account that trades), the embedded broker on a free
port, and the real daemon recording public and private streams from the simulator into it. Credentials
are made up for this run only and shared with the simulator in memory; nothing leaves the machine.
Prints what is being recorded every few seconds and a summary at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import tempfile
from pathlib import Path

from ingest.config import load_settings
from ingest.io.broker import free_port
from ingest.obs.logging import setup_logging
from ingest.sim import SimConfig, SimServer
from ingest.supervisor import Daemon

log = logging.getLogger("ingest.demo")

DEMO_INSTRUMENTS = ("BTC-USDT", "ETH-USDT", "BTC-USDT-SWAP")
DEMO_CHANNELS = ("trades", "books", "tickers", "books5")


async def _trade_on_the_account(sim: SimServer, stop: asyncio.Event) -> None:
    """Place and fill an order now and then, so the private streams have something to record."""
    n = 0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 2.0)  # the demo's pace, not synchronisation
        if stop.is_set():
            return
        n += 1
        side = "buy" if n % 2 else "sell"
        try:
            ord_id = await sim.account.place_order("BTC-USDT", side, "0.01", ord_type="market")
            if n % 3:
                await sim.account.fill(ord_id)
            else:
                await sim.account.cancel(ord_id)
        except Exception as exc:  # a demo script hiccup must not end the demo
            log.warning("demo_account_step_failed", extra={"error": str(exc)})


async def _report(daemon: Daemon, stop: asyncio.Event, every_s: float = 5.0) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
        pipeline = daemon.parts.pipeline
        if pipeline is not None:
            log.info("demo_progress", extra={"frames": pipeline.stats.frames,
                                             "records": dict(sorted(pipeline.stats.records.items())),
                                             "gaps": sum(pipeline.stats.gaps.values()),
                                             "dead_letters": sum(pipeline.stats.dead_letters.values())})


async def run_demo(seconds: float = 0.0) -> int:
    """Run until Ctrl-C (or for `seconds`); the exit code of the daemon."""
    setup_logging("INFO", "text")
    key, secret, passphrase = secrets.token_hex(16), secrets.token_hex(32), secrets.token_hex(8)
    config = SimConfig(instruments=DEMO_INSTRUMENTS, auto_tick_s=0.1, api_key=key, api_secret=secret,
                       passphrase=passphrase, initial_balances=(("USDT", "100000"), ("BTC", "2")))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    with tempfile.TemporaryDirectory(prefix="okx-ingest-demo-") as tmp:
        async with SimServer(config, host="127.0.0.1", port=0) as sim:
            settings = load_settings(
                None,
                okx={"ws_base_url": sim.ws_base, "rest_base_url": sim.rest_base, "private": True,
                     "instruments": list(DEMO_INSTRUMENTS), "channels": list(DEMO_CHANNELS),
                     "subscriptions": [{"channel": "trades-all", "inst_id": "BTC-USDT"},
                                       {"channel": "candle1m", "inst_id": "BTC-USDT"}]},
                kafka={"bootstrap_servers": "embedded", "embedded_port": free_port()},
                journal={"dir": str(Path(tmp) / "journal")},
                obs={"log_format": "text", "metrics_port": 0},
                archive={"url": str(Path(tmp) / "archive")},
            )
            env = {"OKX_API_KEY": key, "OKX_API_SECRET": secret, "OKX_API_PASSPHRASE": passphrase}
            daemon = Daemon(settings, env=env)
            log.info("demo_starting", extra={"simulator": sim.ws_base, "instruments": ",".join(DEMO_INSTRUMENTS),
                                             "stop": "Ctrl-C" if seconds <= 0 else f"after {seconds:g} s"})
            helpers = [asyncio.create_task(_trade_on_the_account(sim, stop)),
                       asyncio.create_task(_report(daemon, stop))]
            if seconds > 0:
                loop.call_later(seconds, stop.set)
            try:
                code = await daemon.run(stop)
            finally:
                stop.set()
                for task in helpers:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if daemon.parts.pipeline is not None:
                st = daemon.parts.pipeline.stats
                log.info("demo_finished", extra={"exit_code": code, "frames": st.frames,
                                                 "records": dict(sorted(st.records.items())),
                                                 "gaps": dict(st.gaps), "dead_letters": dict(st.dead_letters)})
            return code
