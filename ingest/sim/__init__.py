"""A protocol-faithful OKX simulator (the server side of the same protocol); never imports ingest.io.

`SimServer(SimConfig(...))` serves OKX's WebSocket endpoints and REST API on one port from a deterministic,
seeded market and a scripted private account, with composable fault injection (`sim.faults`), counters
(`sim.stats`) and event-based waits for tests. See docs/SIMULATOR.md; scenario files: `ingest.sim.scenario`.
"""

from ingest.sim.account import AccountError, ScriptedAccount
from ingest.sim.clock import ManualWall, SimClock
from ingest.sim.config import KeyEnv, RateLimitHttp, RestLimit, SimConfig
from ingest.sim.faults import Corruption, DropKind, Faults
from ingest.sim.hub import ConnInfo
from ingest.sim.market import Market
from ingest.sim.scenario import Scenario, ScenarioError, load_scenario, parse_scenario
from ingest.sim.server import PreparedTrades, SimServer
from ingest.sim.stats import ConnStats, SimStats
from ingest.sim.tradelog import TradeRow

__all__ = [
    "AccountError", "ConnInfo", "ConnStats", "Corruption", "DropKind", "Faults", "KeyEnv", "ManualWall", "Market",
    "PreparedTrades", "RateLimitHttp", "RestLimit", "Scenario", "ScenarioError", "ScriptedAccount", "SimClock",
    "SimConfig", "SimServer", "SimStats", "TradeRow", "load_scenario", "parse_scenario",
]
