"""Least privilege: `perm` parsing and what is refused, warned about and reported (never the key)."""

from __future__ import annotations

import logging
import secrets

import httpx
import pytest

from ingest.config import OkxSettings
from ingest.core.clock import ServerClock
from ingest.credentials import CredentialStore
from ingest.io.rest import LimiterRegistry, OkxRestClient
from ingest.services.permissions import KeyPermissionError, Permission, check_key_permissions, parse_perm


def _client(row: dict[str, str], env: dict[str, str]) -> OkxRestClient:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"code": "0", "msg": "", "data": [row]})

    return OkxRestClient(clock=ServerClock(lambda: 1_700_000_000_000), credentials=CredentialStore(env),
                         base_url="https://openapi.okx.com", registry=LimiterRegistry(),
                         transport=httpx.MockTransport(answer))


def _env() -> dict[str, str]:
    return {"OKX_API_KEY": secrets.token_hex(16), "OKX_API_SECRET": secrets.token_hex(16),
            "OKX_API_PASSPHRASE": secrets.token_hex(8)}


def test_perm_is_a_comma_separated_string() -> None:
    assert parse_perm("read_only") == (frozenset({Permission.READ_ONLY}), frozenset())
    assert parse_perm("read_only,withdraw,trade") == (frozenset(Permission), frozenset())
    assert parse_perm(" read_only , futures_x ,") == (frozenset({Permission.READ_ONLY}), frozenset({"futures_x"}))


async def test_read_only_key_is_accepted_and_reported_once_without_the_key(caplog: pytest.LogCaptureFixture) -> None:
    env = _env()
    row = {"uid": "44705892343619584", "mainUid": "44705892343619584", "perm": "read_only", "ip": "", "acctLv": "2"}
    with caplog.at_level(logging.INFO, logger="ingest.services.permissions"):
        async with _client(row, env) as client:
            info = await check_key_permissions(client, OkxSettings())
    assert info.read_only and not info.sub_account and not info.ip_bound
    (report,) = [r for r in caplog.records if r.getMessage() == "okx_key_permissions"]
    assert report.__dict__["perms"] == ["read_only"] and report.__dict__["uid"] == "44705892343619584"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("ingest")]
    for value in env.values():
        assert value not in caplog.text and value not in str(report.__dict__)


async def test_sub_account_and_bound_ips_are_reported() -> None:
    row = {"uid": "2", "mainUid": "1", "perm": "read_only", "ip": "203.0.113.7,203.0.113.8"}
    async with _client(row, _env()) as client:
        info = await check_key_permissions(client, OkxSettings())
    assert info.sub_account and info.ip_bound


async def test_withdraw_permission_is_refused_unless_allowed() -> None:
    row = {"uid": "1", "mainUid": "1", "perm": "read_only,withdraw", "ip": "203.0.113.7"}
    async with _client(row, _env()) as client:
        with pytest.raises(KeyPermissionError, match=r"can withdraw.*read-only key.*allow_withdraw_permission"):
            await check_key_permissions(client, OkxSettings())
        info = await check_key_permissions(client, OkxSettings(allow_withdraw_permission=True))
    assert Permission.WITHDRAW in info.perms


async def test_trade_permission_is_warned_about_or_refused_by_config(caplog: pytest.LogCaptureFixture) -> None:
    row = {"uid": "1", "mainUid": "1", "perm": "read_only,trade", "ip": ""}
    async with _client(row, _env()) as client:
        with caplog.at_level(logging.WARNING, logger="ingest.services.permissions"):
            await check_key_permissions(client, OkxSettings())
        with pytest.raises(KeyPermissionError, match="can trade"):
            await check_key_permissions(client, OkxSettings(allow_trade_permission=False))
    warnings = {r.getMessage() for r in caplog.records
                if r.name == "ingest.services.permissions" and r.levelno == logging.WARNING}
    assert warnings == {"okx_key_can_trade", "okx_key_not_ip_bound"}
