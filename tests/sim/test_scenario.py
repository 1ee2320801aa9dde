"""Scenario files (TOML and JSON) and the `okx-ingest simulate` command."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from ingest.sim import KeyEnv, ScenarioError, SimConfig, SimServer, load_scenario, parse_scenario
from ingest.sim.scenario import apply_config
from tests.sim.wsclient import Client, Frame, get_json, pushes

TOML = """
[config]
seed = 7
instruments = ["BTC-USDT", "BTC-USDT-SWAP"]
checksum = true
idle_timeout_s = 10
key_env = "demo"
initial_balances = [["USDT", "500"]]

[[steps]]
at_tick = 1
name = "o1"
do = "account.place_order"
inst_id = "BTC-USDT"
side = "buy"
sz = "0.01"
px = "43000"

[[steps]]
at_tick = 2
do = "account.fill"
ord_id = "$o1"

[[steps]]
at_tick = 3
do = "faults.drop"
kind = "abort"
endpoint = "public"
"""


def test_toml_and_json_scenarios_parse_to_the_same_steps(tmp_path: Path) -> None:
    toml_path = tmp_path / "s.toml"
    toml_path.write_text(TOML)
    scenario = load_scenario(toml_path)
    json_path = tmp_path / "s.json"
    json_path.write_text(json.dumps({"config": dict(scenario.config),
                                     "steps": [{"do": s.do, "at_tick": s.at_tick, **s.kwargs,
                                                **({"name": s.name} if s.name else {})} for s in scenario.steps]}))
    assert load_scenario(json_path) == scenario
    config = apply_config(SimConfig(), scenario.config)
    assert config.instruments == ("BTC-USDT", "BTC-USDT-SWAP") and config.key_env is KeyEnv.DEMO
    assert config.idle_timeout_s == 10.0 and config.initial_balances == (("USDT", "500"),)


@pytest.mark.parametrize(("raw", "problem"), [
    ({"steps": [{"do": "os.system", "at_s": 1}]}, "'do'"),
    ({"steps": [{"do": "faults.drop", "at_s": "soon"}]}, "at_s"),
    ({"stepz": []}, "top-level"),
])
def test_invalid_scenarios_are_refused_with_the_reason(raw: dict[str, object], problem: str) -> None:
    with pytest.raises(ScenarioError, match=problem):
        parse_scenario(raw)
    with pytest.raises(ScenarioError, match="not a settable"):
        apply_config(SimConfig(), {"no_such_field": 1})


async def test_a_scenario_runs_its_steps_at_their_ticks(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(TOML)
    scenario = load_scenario(path)
    config = apply_config(SimConfig(api_key="k", api_secret="s", passphrase="p"), scenario.config)
    async with SimServer(config) as sim, await Client.connect(sim.ws_url("public")) as c:
        await c.subscribe({"channel": "trades", "instId": "BTC-USDT"})
        runner = asyncio.create_task(sim.run_scenario(scenario))
        for _ in range(3):
            await sim.tick(1)
        await runner
        assert await c.wait_closed() == 1006
        order = next(iter(sim.account.orders.values()))
        assert order.state == "filled"
        assert sim.account.balances["USDT"] == 500 - 430


async def test_the_simulate_command_serves_until_terminated(tmp_path: Path) -> None:
    scenario = tmp_path / "s.json"
    scenario.write_text(json.dumps({"config": {"seed": 3}, "steps": [{"at_s": 0, "do": "faults.clock_offset",
                                                                       "ms": 1000}]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OKX_API_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingest.cli", "simulate", "--port", "0", "--scenario", str(scenario),
        stderr=asyncio.subprocess.PIPE, env=env)
    try:
        assert proc.stderr is not None
        base = None
        while base is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
            assert line, "the simulator exited before listening"
            match = re.search(r"REST (http://[\d.]+:\d+)", line)
            base = match.group(1) if match else None
        async with aiohttp.ClientSession() as session:
            status, body = await get_json(session, base + "/api/v5/public/time")
            assert status == 200 and body["code"] == "0"
        ws_base = base.replace("http://", "ws://")
        async with await Client.connect(ws_base + "/ws/v5/public") as c:
            await c.subscribe({"channel": "tickers", "instId": "BTC-USDT"})
            frames: list[Frame] = []
            while len(pushes(frames, "tickers")) < 3:  # the automatic tick loop keeps pushing
                frames.append(await c.recv())
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
