"""Scenario files: simulator settings plus timed steps that call the fault, market and account APIs.

A scenario is JSON or TOML (chosen by the file suffix: `.toml`, else JSON) with two optional parts:

```toml
[config]                      # any SimConfig field; lists become tuples, enums take their value
seed = 7
instruments = ["BTC-USDT", "BTC-USDT-SWAP"]
auto_tick_s = 0.1
checksum = true
idle_timeout_s = 30

[[steps]]
at_s = 5                      # seconds after the scenario starts ...
do = "faults.drop"            # ... call sim.faults.drop(kind="abort", endpoint="public")
kind = "abort"
endpoint = "public"

[[steps]]
at_tick = 100                 # ... or once the market has made 100 steps
every_s = 30                  # optional: repeat every 30 s ...
times = 3                     # ... 3 times in all
do = "faults.notice"
close_after_s = 5

[[steps]]
at_s = 2
name = "o1"                   # remember the result as $o1
do = "account.place_order"
inst_id = "BTC-USDT"
side = "buy"
sz = "0.01"
px = "43000"

[[steps]]
at_s = 4
do = "account.fill"
ord_id = "$o1"                # a string "$name" is replaced by that step's result
```

JSON has the same shape: `{"config": {...}, "steps": [{"at_s": 5, "do": "faults.drop", "kind": "abort"}]}`.
Every key of a step other than `at_s`, `at_tick`, `every_s`, `times`, `name` and `do` is passed as a keyword
argument. `do` must name one of `ACTIONS`; steps run concurrently, each at its own time, so faults compose.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ingest.sim.config import SimConfig

if TYPE_CHECKING:
    from ingest.sim.server import SimServer

log = logging.getLogger("ingest.sim.scenario")

#: What a step may call: "<target>.<method>" on sim.faults, sim.market, sim.account or the server.
ACTIONS: frozenset[str] = frozenset({
    "faults.drop", "faults.stall", "faults.unstall", "faults.notice", "faults.revoke_login", "faults.send_raw",
    "faults.push_unknown_channel", "faults.reject_connects", "faults.skip_sequence", "faults.corrupt",
    "faults.reset_sequence", "faults.reject_logins", "faults.clock_offset", "faults.rest_rate_limit",
    "faults.rest_error", "faults.rest_slow", "faults.rest_hold",
    "faults.rest_release", "faults.clear",
    "market.freeze", "market.reset_sequence", "market.force_liquidation", "market.set_instrument_state",
    "market.add_instrument",
    "account.place_order", "account.fill", "account.cancel", "account.set_balance", "account.transfer",
    "account.place_algo", "account.trigger_algo", "account.cancel_algo", "account.repeat_order_push",
    "sim.tick", "sim.pump_trades",
})
_STEP_KEYS = frozenset({"at_s", "at_tick", "every_s", "times", "name", "do"})


class ScenarioError(ValueError):
    """A scenario file that cannot be run; the message names the step or key and what is wrong."""


@dataclass(frozen=True, slots=True)
class ScenarioStep:
    """One timed call."""

    do: str
    kwargs: Mapping[str, object]
    at_s: float | None = None
    at_tick: int | None = None
    every_s: float | None = None
    times: int = 1
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Scenario:
    config: Mapping[str, object]
    steps: tuple[ScenarioStep, ...]


def parse_scenario(raw: Mapping[str, object]) -> Scenario:
    """Validate a scenario document (already parsed from JSON or TOML)."""
    unknown = set(raw) - {"config", "steps"}
    if unknown:
        raise ScenarioError(f"unknown top-level keys {sorted(unknown)}; use 'config' and 'steps'")
    config = raw.get("config", {})
    if not isinstance(config, Mapping):
        raise ScenarioError("'config' must be a table/object of SimConfig fields")
    steps_raw = raw.get("steps", [])
    if not isinstance(steps_raw, list):
        raise ScenarioError("'steps' must be a list")
    steps = []
    for n, item in enumerate(steps_raw, 1):
        if not isinstance(item, Mapping):
            raise ScenarioError(f"step {n} must be a table/object")
        do = item.get("do")
        if do not in ACTIONS:
            raise ScenarioError(f"step {n}: 'do' = {do!r} is not one of {sorted(ACTIONS)}")
        at_s, at_tick = item.get("at_s"), item.get("at_tick")
        if (at_s is not None and not isinstance(at_s, int | float)) or (at_tick is not None and not isinstance(
                at_tick, int)):
            raise ScenarioError(f"step {n}: at_s must be a number and at_tick an integer")
        every_s, times, name = item.get("every_s"), item.get("times", 1), item.get("name")
        if (every_s is not None and not isinstance(every_s, int | float)) or not isinstance(times, int) or times < 1:
            raise ScenarioError(f"step {n}: every_s must be a number and times a positive integer")
        if name is not None and not isinstance(name, str):
            raise ScenarioError(f"step {n}: name must be a string")
        kwargs = {k: v for k, v in item.items() if k not in _STEP_KEYS}
        steps.append(ScenarioStep(str(do), kwargs, None if at_s is None else float(at_s), at_tick,
                                  None if every_s is None else float(every_s), times, name))
    return Scenario(dict(config), tuple(steps))


def load_scenario(path: Path) -> Scenario:
    """Read a `.toml` or JSON scenario file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc}") from None
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ScenarioError(f"scenario {path} does not parse: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ScenarioError(f"scenario {path} must be a table/object at the top")
    return parse_scenario(raw)


def apply_config(base: SimConfig, overrides: Mapping[str, object]) -> SimConfig:
    """`base` with the scenario's `config` values, converted to the fields' types."""
    fields = {f.name: f for f in dataclasses.fields(SimConfig)}
    values: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in fields or key in ("wall_ms", "timer", "rest_limits"):
            raise ScenarioError(f"config.{key} is not a settable SimConfig field")
        current = getattr(base, key)
        if isinstance(current, enum.Enum):
            value = type(current)(value)
        elif isinstance(current, tuple) and isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        values[key] = value
    return dataclasses.replace(base, **values)


async def run_scenario(sim: SimServer, scenario: Scenario) -> None:
    """Run every step at its time (concurrently); a failing step is logged and does not stop the others."""
    timer = sim.hub.timer
    start = timer.now()
    results: dict[str, object] = {}

    async def run_step(step: ScenarioStep) -> None:
        if step.at_tick is not None:
            target = step.at_tick
            await sim.wait_until(lambda: sim.market.steps >= target, timeout=None)
        if step.at_s is not None:
            await timer.sleep(start + step.at_s - timer.now())
        for n in range(step.times):
            if n:
                await timer.sleep(step.every_s or 0.0)
            try:
                result = await sim.call(step.do, _resolve(step.kwargs, results))
            except Exception:
                log.exception("scenario step %s failed", step.do)
                return
            if step.name:
                results[step.name] = result

    await asyncio.gather(*(run_step(s) for s in scenario.steps))


def _resolve(kwargs: Mapping[str, object], results: Mapping[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in kwargs.items():
        if isinstance(value, str) and value.startswith("$"):
            if value[1:] not in results:
                raise ScenarioError(f"{key} = {value}: no earlier step named {value[1:]!r} has a result")
            value = results[value[1:]]
        out[key] = value
    return out
