"""A listener of the running config: its spec (what the config asked for) and the net listener
(TCP or UDP, one interface) that serves it."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from lbd.config.model import ListenerSpec
from lbd.endpoints.route import Route
from lbd.net.listener import Listener as NetListener


@dataclass(slots=True, eq=False)
class Listener:
    """One listener of the config (``spec``) and the socket that serves it (``net``)."""

    spec: ListenerSpec
    net: NetListener  # TCP or UDP, one interface

    @property
    def route(self) -> Route:
        return self.net.route

    @property
    def bound(self) -> tuple[str, int]:
        """The real address, port 0 resolved."""
        return self.net.bound

    @property
    def sock(self) -> socket.socket | None:
        return self.net.sock

    @property
    def removed(self) -> bool:
        return self.net.removed

    def describe(self) -> str:
        host, port = self.bound
        return (
            f"{self.spec.protocol} [{host}]:{port}"
            if ":" in host
            else f"{self.spec.protocol} {host}:{port}"
        )

    def repoint(self, spec: ListenerSpec, route: Route) -> None:
        self.spec = spec
        self.net.repoint(route, spec.external, spec.filtered)

    async def start(self) -> None:
        await self.net.start()

    def close(self) -> None:
        """Stop accepting. TCP connections carry on; UDP sessions end, since their replies can
        only leave through the listener socket."""
        self.net.close()
