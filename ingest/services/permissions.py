"""Least privilege: refuse an API key that can do more than okx-ingest needs (it only reads).

A leaked read-only key exposes account data; a leaked withdraw key empties the account. Every process that
holds a key (recorder and backfill worker) reads `GET /api/v5/account/config` at startup and after each
rotation, and refuses withdraw (and, if configured, trade) permission.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ingest.config import OkxSettings
from ingest.core.rest_limits import ACCOUNT_CONFIG_PATH
from ingest.credentials import UnsafeKeyError
from ingest.errors import CredentialError, IngestError, ProtocolError
from ingest.io.rest import OkxRestClient

log = logging.getLogger(__name__)


class Permission(enum.StrEnum):
    """The values of `perm` (SPEC 8.3)."""

    READ_ONLY = "read_only"
    TRADE = "trade"
    WITHDRAW = "withdraw"


class KeyPermissionError(UnsafeKeyError):
    """The API key has more rights than the configuration allows."""


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What the daemon knows about its key; everything here is safe to log (the key itself is not here)."""

    uid: str
    main_uid: str
    sub_account: bool
    perms: frozenset[Permission]
    unknown_perms: frozenset[str]
    ip_bound: bool
    account_level: str
    key_hint: str

    @property
    def read_only(self) -> bool:
        return self.perms <= {Permission.READ_ONLY} and not self.unknown_perms


def parse_perm(perm: str) -> tuple[frozenset[Permission], frozenset[str]]:
    """`"read_only,withdraw,trade"` -> known permissions and any tokens OKX added since SPEC 8.3."""
    tokens = {t.strip() for t in perm.split(",") if t.strip()}
    values = {p.value for p in Permission}
    known = {Permission(t) for t in tokens if t in values}
    return frozenset(known), frozenset(tokens - {p.value for p in known})


def _text(row: dict[str, object], name: str) -> str:
    value = row.get(name, "")
    return value if isinstance(value, str) else str(value)


async def check_key_permissions(client: OkxRestClient, settings: OkxSettings) -> KeyInfo:
    """Read the key's permissions, log them once, and raise KeyPermissionError if they exceed the config."""
    if client.credentials is None:
        raise CredentialError("checking key permissions needs an API key: set OKX_API_KEY, OKX_API_SECRET and "
                              "OKX_API_PASSPHRASE (or their *_FILE variants)")
    rows = await client.get(ACCOUNT_CONFIG_PATH)
    if not rows:
        raise ProtocolError(f"{ACCOUNT_CONFIG_PATH} returned no rows; cannot tell the key's permissions")
    row = rows[0]
    perm = row.get("perm")
    if not isinstance(perm, str):
        raise ProtocolError(f"{ACCOUNT_CONFIG_PATH} has no perm string; cannot tell the key's permissions")
    perms, unknown = parse_perm(perm)
    uid, main_uid = _text(row, "uid"), _text(row, "mainUid")
    info = KeyInfo(
        uid=uid, main_uid=main_uid, sub_account=bool(main_uid) and uid != main_uid, perms=perms,
        unknown_perms=unknown, ip_bound=bool(_text(row, "ip").strip()), account_level=_text(row, "acctLv"),
        key_hint=client.credentials.current().key_hint,
    )
    log.info("okx_key_permissions", extra={
        "uid": info.uid, "sub_account": info.sub_account, "perms": sorted(p.value for p in perms),
        "unknown_perms": sorted(unknown), "ip_bound": info.ip_bound, "account_level": info.account_level,
        "key_hint": info.key_hint, "environment": client.environment.value,
    })
    if unknown:
        log.warning("okx_key_unknown_permissions", extra={"unknown_perms": sorted(unknown), "key_hint": info.key_hint,
                                                           "fix": "okx-ingest needs read_only only; check what "
                                                                  "these permissions allow on OKX's API page"})
    if Permission.WITHDRAW in perms and not settings.allow_withdraw_permission:
        raise KeyPermissionError(
            f"the API key {info.key_hint} can withdraw funds, and okx-ingest only reads: create a read-only key "
            "on OKX's API page and use it instead (or, accepting the risk, set okx.allow_withdraw_permission "
            "= true)"
        )
    if Permission.TRADE in perms:
        if not settings.allow_trade_permission:
            raise KeyPermissionError(
                f"the API key {info.key_hint} can trade, and okx.allow_trade_permission is false: create a "
                "read-only key on OKX's API page and use it instead"
            )
        log.warning("okx_key_can_trade", extra={"key_hint": info.key_hint, "fix": (
            "okx-ingest only reads; a read-only key limits the damage if it leaks (set "
            "okx.allow_trade_permission = false to refuse keys that can trade)")})
    if not info.ip_bound and (Permission.TRADE in perms or Permission.WITHDRAW in perms):
        log.warning("okx_key_not_ip_bound", extra={"key_hint": info.key_hint, "fix": (
            "bind the key to this host's IPs on OKX's API page (OKX also deletes unbound trade/withdraw keys "
            "after 14 days without use)")})
    return info


async def require_safe_key(
    client: OkxRestClient, settings: OkxSettings, *, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
) -> KeyInfo:
    """`check_key_permissions`, retried with backoff while OKX cannot be reached (a key is never assumed safe
    just because OKX did not answer); raises KeyPermissionError or any other refusal at once."""
    delay = 1.0
    while True:
        try:
            return await check_key_permissions(client, settings)
        except IngestError as exc:
            if not exc.retriable:
                raise
            log.warning("key_permissions_unverified", extra={"error": str(exc), "retry_in_s": delay})
        await sleep(delay)
        delay = min(delay * 2, 60.0)
