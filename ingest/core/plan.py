"""Subscriptions -> connections -> subscribe requests, pure.

OKX limits what one connection may carry (fewer than 30 depth channels is advised, `books-l2-tbt` may not
share a connection with `books`/`books50-l2-tbt` of the same instrument since 2024-07-17) and how large one
request may be (64 KB, else close 1009). Deciding that here, without sockets, lets property tests prove the
limits hold for any configuration, and keeps the connection code free of packing logic.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import orjson

from ingest.errors import IngestError
from ingest.okx.channels import Endpoint, SubArg, is_depth

#: OKX allows request ids of 1-32 alphanumerics; sizes are computed for the longest, so any id fits.
MAX_REQUEST_ID_LEN = 32
_L2TBT = "books-l2-tbt"
#: Channels OKX refuses (64004) or silently drops next to `books-l2-tbt` for the same instId (SPEC 0, 2024-07-17).
_L2TBT_EXCLUSIVE = frozenset({"books", "books50-l2-tbt"})


class PlanError(IngestError):
    """A subscription cannot be planned at all (unknown channel, or one arg larger than a request may be).

    An `IngestError`, so the command line reports it as a configuration problem (exit 2), not a traceback."""


@dataclass(frozen=True, slots=True)
class PlanLimits:
    """Per-connection and per-request limits (from `WsSettings`)."""

    args_per_connection: int = 100
    depth_per_connection: int = 29
    max_request_bytes: int = 60_000

    def __post_init__(self) -> None:
        if self.args_per_connection <= 0 or self.depth_per_connection <= 0 or self.max_request_bytes <= 0:
            raise ValueError(f"plan limits must be positive: {self}")


@dataclass(frozen=True, slots=True)
class PlannedConnection:
    """One logical connection: a stable name, its endpoint, whether it logs in, and the args it carries."""

    name: str
    endpoint: Endpoint
    login: bool
    args: tuple[SubArg, ...]

    @property
    def depth_count(self) -> int:
        return sum(1 for a in self.args if is_depth(a.channel))


def conflicts(a: SubArg, b: SubArg) -> bool:
    """True when OKX will not let `a` and `b` share one connection (l2-tbt vs books/books50 of one instId)."""
    if a.inst_id is None or a.inst_id != b.inst_id:
        return False
    pair = {a.channel, b.channel}
    return _L2TBT in pair and bool(pair & _L2TBT_EXCLUSIVE)


def needs_login(endpoint: Endpoint, arg: SubArg) -> bool:
    """Every private-endpoint connection logs in; elsewhere only the channels that demand it."""
    return endpoint is Endpoint.PRIVATE or arg.needs_login


@dataclass(slots=True)
class _Bin:
    args: list[SubArg] = field(default_factory=list)
    depth: int = 0
    by_inst: dict[str, set[str]] = field(default_factory=dict)

    def fits(self, arg: SubArg, limits: PlanLimits) -> bool:
        if len(self.args) >= limits.args_per_connection:
            return False
        if is_depth(arg.channel) and self.depth >= limits.depth_per_connection:
            return False
        held = self.by_inst.get(arg.inst_id, set()) if arg.inst_id is not None else set()
        return not any(conflicts(arg, SubArg(ch, inst_id=arg.inst_id)) for ch in held)

    def add(self, arg: SubArg) -> None:
        self.args.append(arg)
        if is_depth(arg.channel):
            self.depth += 1
        if arg.inst_id is not None:
            self.by_inst.setdefault(arg.inst_id, set()).add(arg.channel)


def _group_name(endpoint: Endpoint, login: bool) -> str:
    base = endpoint.name.lower()
    # Private connections always log in; elsewhere the suffix tells the operator which ones need a key.
    return f"{base}-login" if login and endpoint is not Endpoint.PRIVATE else base


def plan_connections(args: Iterable[SubArg], limits: PlanLimits) -> tuple[PlannedConnection, ...]:
    """Spread `args` (duplicates ignored, order kept) over as few connections as the limits allow.

    Groups by (endpoint, login) so a public connection never needs credentials, then packs first-fit,
    which keeps names stable for an unchanged configuration. Names are `<endpoint>[-login]-<n>`.
    """
    groups: dict[tuple[Endpoint, bool], list[_Bin]] = {}
    seen: set[SubArg] = set()
    for arg in args:
        if arg in seen:
            continue
        seen.add(arg)
        endpoint = arg.endpoint
        if endpoint is None:
            raise PlanError(f"channel {arg.channel!r} is not served by any OKX WebSocket endpoint; check the config")
        if _request_size("subscribe", [arg]) >= limits.max_request_bytes:
            raise PlanError(f"subscription {arg} alone exceeds {limits.max_request_bytes} bytes per request")
        bins = groups.setdefault((endpoint, needs_login(endpoint, arg)), [])
        target = next((b for b in bins if b.fits(arg, limits)), None)
        if target is None:
            target = _Bin()
            bins.append(target)
        target.add(arg)
    out: list[PlannedConnection] = []
    for (endpoint, login), bins in groups.items():
        prefix = _group_name(endpoint, login)
        out.extend(PlannedConnection(f"{prefix}-{i}", endpoint, login, tuple(b.args)) for i, b in enumerate(bins))
    return tuple(out)


def encode_request(op: str, args: Sequence[SubArg], req_id: str | None = None) -> bytes:
    """The compact JSON of a subscribe/unsubscribe request, exactly as sent."""
    body: dict[str, object] = {"id": req_id} if req_id is not None else {}
    body["op"] = op
    body["args"] = [a.to_okx() for a in args]
    return orjson.dumps(body)


def _request_size(op: str, args: Sequence[SubArg]) -> int:
    return len(encode_request(op, args, "x" * MAX_REQUEST_ID_LEN))


def batch_args(op: str, args: Sequence[SubArg], max_bytes: int) -> list[tuple[SubArg, ...]]:
    """Split `args` (order kept) into as few requests as fit: each encodes to fewer than `max_bytes` bytes.

    Sizes are exact for the longest allowed id, so the caller may choose any id. Fewer, fuller requests
    spend less of the 480 requests/hour a connection may make.
    """
    overhead = _request_size(op, [])
    batches: list[tuple[SubArg, ...]] = []
    current: list[SubArg] = []
    size = overhead
    for arg in args:
        arg_size = len(orjson.dumps(arg.to_okx()))
        if overhead + arg_size >= max_bytes:
            raise PlanError(f"subscription {arg} alone exceeds {max_bytes} bytes per request")
        added = arg_size + (1 if current else 0)
        if current and size + added >= max_bytes:
            batches.append(tuple(current))
            current, size, added = [], overhead, arg_size
        current.append(arg)
        size += added
    if current:
        batches.append(tuple(current))
    return batches
