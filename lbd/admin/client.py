"""Talking to a running lbd's admin API: for ``lbd status`` and ``lbd explain``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from lbd.config.model import Admin

Json = dict[str, Any]
TIMEOUT = aiohttp.ClientTimeout(total=10)


class AdminUnreachable(Exception):
    """No admin API answered at the target (not running, wrong address, no permission)."""


@dataclass(frozen=True, slots=True)
class AdminTarget:
    address: str | None = None  # HOST:PORT ([IPv6]:PORT)
    socket: str | None = None

    @classmethod
    def of(cls, admin: Admin) -> AdminTarget:
        return cls(socket=admin.socket) if admin.socket else cls(address=admin.describe())

    def describe(self) -> str:
        return f"unix:{self.socket}" if self.socket else str(self.address)


async def call(
    target: AdminTarget,
    path: str,
    params: dict[str, str] | None = None,
    method: str = "GET",
    token: str | None = None,
    body: Json | None = None,
) -> tuple[int, Json]:
    """(HTTP status, JSON body) of one admin call (``body``: sent as JSON)."""
    connector: aiohttp.BaseConnector
    if target.socket:
        connector, base = aiohttp.UnixConnector(path=target.socket), "http://lbd"
    else:
        connector, base = aiohttp.TCPConnector(), f"http://{target.address}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session,
            session.request(
                method, base + path, params=params, headers=headers, json=body
            ) as response,
        ):
            text = await response.text()
            try:
                body = json.loads(text)
            except ValueError:
                body = {"error": text.strip() or response.reason}
            return response.status, body
    except (aiohttp.ClientError, OSError, TimeoutError) as error:
        raise AdminUnreachable(
            f"no lbd admin API at {target.describe()}: {error or type(error).__name__}"
        ) from None
