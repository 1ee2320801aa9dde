"""A deliberately independent OKX client for testing the simulator: plain `websockets`/`aiohttp` and hand-written
HMAC, nothing from `ingest.okx`, so a shared misunderstanding cannot make both sides agree by accident.

`sync()` is how the tests wait without sleeping: it sends the text `ping` and collects every frame until the
`pong`, and since one connection's frames arrive in order, everything sent before the pong is then in hand.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import websockets
from websockets.asyncio.client import ClientConnection

Frame = dict[str, Any]
RECV_TIMEOUT_S = 5.0


def hmac_b64(secret: str, message: str) -> str:
    return base64.b64encode(hmac.new(secret.encode(), message.encode(), hashlib.sha256).digest()).decode()


def login_args(key: str, secret: str, passphrase: str, ts: str | None = None) -> dict[str, str]:
    """OKX WS login: sign = Base64(HMAC_SHA256(secret, ts + "GET" + "/users/self/verify")), ts in Unix seconds."""
    ts = str(int(time.time())) if ts is None else ts
    sign = hmac_b64(secret, f"{ts}GET/users/self/verify")
    return {"apiKey": key, "passphrase": passphrase, "timestamp": ts, "sign": sign}


def iso_ms(epoch_ms: int) -> str:
    dt = datetime.fromtimestamp(epoch_ms // 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


def rest_headers(key: str, secret: str, passphrase: str, method: str, path_qs: str, body: str = "",
                 epoch_ms: int | None = None, demo: bool = False) -> dict[str, str]:
    """OKX REST auth headers: prehash = ISO-8601 ms timestamp + METHOD + path?query + body."""
    ts = iso_ms(int(time.time() * 1000) if epoch_ms is None else epoch_ms)
    headers = {"OK-ACCESS-KEY": key, "OK-ACCESS-SIGN": hmac_b64(secret, f"{ts}{method}{path_qs}{body}"),
               "OK-ACCESS-TIMESTAMP": ts, "OK-ACCESS-PASSPHRASE": passphrase, "Content-Type": "application/json"}
    if demo:
        headers["x-simulated-trading"] = "1"
    return headers


class Client:
    """One WebSocket connection to the simulator with JSON helpers."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> Client:
        return cls(await websockets.connect(url, max_size=2**24, ping_interval=None, **kwargs))

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()

    async def send(self, msg: object) -> None:
        await self.ws.send(msg if isinstance(msg, str) else json.dumps(msg))

    async def request(self, op: str, args: list[dict[str, str]], req_id: str | None = None) -> None:
        msg: Frame = {"op": op, "args": args}
        if req_id is not None:
            msg = {"id": req_id, **msg}
        await self.send(msg)

    async def recv_text(self) -> str:
        data = await asyncio.wait_for(self.ws.recv(), RECV_TIMEOUT_S)
        assert isinstance(data, str), f"expected a text frame, got {data!r}"
        return data

    async def recv(self) -> Frame:
        text = await self.recv_text()
        msg = json.loads(text)
        assert isinstance(msg, dict)
        return msg

    async def recv_until(self, predicate: Callable[[Frame], bool]) -> tuple[Frame, list[Frame]]:
        """The first frame matching `predicate`, and the JSON frames before it."""
        before: list[Frame] = []
        while True:
            msg = await self.recv()
            if predicate(msg):
                return msg, before
            before.append(msg)

    async def sync_text(self) -> list[str]:
        """Every text frame received until the answer to a `ping` (so all earlier frames)."""
        await self.send("ping")
        out: list[str] = []
        while True:
            text = await self.recv_text()
            if text == "pong":
                return out
            out.append(text)

    async def sync(self) -> list[Frame]:
        return [json.loads(t) for t in await self.sync_text()]

    async def login(self, key: str, secret: str, passphrase: str, ts: str | None = None) -> Frame:
        await self.request("login", [login_args(key, secret, passphrase, ts)])
        return await self.recv()

    async def subscribe(self, *args: dict[str, str]) -> list[Frame]:
        """Subscribe and return the acks/errors (one per arg) plus anything pushed before the last of them."""
        await self.request("subscribe", list(args))
        out: list[Frame] = []
        answered = 0
        while answered < len(args):
            msg = await self.recv()
            out.append(msg)
            if msg.get("event") in ("subscribe", "error"):
                answered += 1
        return out

    async def wait_closed(self) -> int | None:
        """Read until the server closes; the close code (1006 when the connection was cut)."""
        try:
            while True:
                await asyncio.wait_for(self.ws.recv(), RECV_TIMEOUT_S)
        except websockets.ConnectionClosed:
            pass
        return self.ws.close_code


def pushes(frames: list[Frame], channel: str) -> list[Frame]:
    return [f for f in frames if "data" in f and f.get("arg", {}).get("channel") == channel]


async def get_json(session: aiohttp.ClientSession, url: str,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with session.get(url, headers=headers) as resp:
        return resp.status, json.loads(await resp.text())
