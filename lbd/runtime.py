"""The one owner of a worker's live state: routes, listeners and connections.

``start`` binds every listener or none; ``stop_accepting``/``drain``/``close_all`` are the
shutdown phases the worker drives. Reload (``apply`` of a diff) will live here too.
"""

from __future__ import annotations

import asyncio
import random
import socket
from dataclasses import dataclass

import structlog

from lbd import __version__
from lbd.config.model import Config, ListenerSpec, listeners_of
from lbd.config.render import config_hash
from lbd.net.connections import ConnectionSet
from lbd.net.listeners import bind_tcp_listener
from lbd.net.tcp_proxy import Downstream
from lbd.observability.metrics import Snapshot, runtime_snapshot
from lbd.observability.stats import ProcessStats
from lbd.route import Route, build_route

log = structlog.get_logger("lbd.runtime")


class ListenerError(Exception):
    """A listener could not be bound; names the listener and the service."""


@dataclass(slots=True)
class Listener:
    spec: ListenerSpec
    route: Route
    sock: socket.socket
    server: asyncio.Server | None = None

    @property
    def bound(self) -> tuple[str, int]:
        """The real address, port 0 resolved."""
        host, port = self.sock.getsockname()[:2]
        return host, port


class Runtime:
    def __init__(self, config: Config, rng: random.Random | None = None) -> None:
        self.config = config
        self.config_hash = config_hash(config)
        self.process = ProcessStats()
        self.ready = False  # listeners bound and the config applied; False again at shutdown
        self.connections: ConnectionSet[Downstream] = ConnectionSet()
        self.routes: dict[tuple[str, int], Route] = {}
        self.listeners: list[Listener] = []
        for service in config.services:
            for index, port in enumerate(service.ports):
                self.routes[(service.key, index)] = build_route(service, port, rng)

    async def start(self) -> None:
        """Bind every listener, or none: a failure closes what was opened and raises."""
        loop = asyncio.get_running_loop()
        specs = [spec for s in self.config.services for spec in listeners_of(s, self.config.node)]
        try:
            for spec in specs:
                route = self.routes[(spec.service, spec.port_index)]
                try:
                    sock = bind_tcp_listener(spec.address, spec.port)
                except OSError as error:
                    raise ListenerError(
                        f"cannot bind {spec.describe()} ({spec.kind} of {spec.service}): "
                        f"{error.strerror or error}"
                    ) from None
                listener = Listener(spec, route, sock)
                self.listeners.append(listener)
                listener.server = await loop.create_server(
                    lambda route=route: Downstream(route, self.connections),  # type: ignore[misc]
                    sock=sock,
                    backlog=4096,
                )
        except BaseException:
            self.stop_accepting()
            self.listeners.clear()
            raise
        self.ready = True
        for listener in self.listeners:
            host, port = listener.bound
            log.info(
                "listening",
                listener=f"{listener.spec.protocol} {host}:{port}"
                if ":" not in host
                else f"{listener.spec.protocol} [{host}]:{port}",
                kind=listener.spec.kind,
                route=listener.route.label,
                strategy=listener.route.strategy,
                endpoints=len(listener.route.pool.members),
            )

    def listener_for(self, service: str, port_index: int = 0, kind: str = "clusterIP") -> Listener:
        for listener in self.listeners:
            spec = listener.spec
            if spec.service == service and spec.port_index == port_index and spec.kind == kind:
                return listener
        raise KeyError((service, port_index, kind))

    def metrics_snapshot(self) -> Snapshot:
        return runtime_snapshot(
            self.routes.values(), self.connections, self.process, self.config_hash, __version__
        )

    def stop_accepting(self) -> None:
        """Shutdown phase 1: close every listening socket; open connections carry on."""
        self.ready = False
        for listener in self.listeners:
            if listener.server is not None:
                listener.server.close()
            else:
                listener.sock.close()

    async def drain(self) -> None:
        """Shutdown phase 2: wait for connections to end; each is closed when its service's
        drainTimeout has passed. Returns when none is left."""
        loop = asyncio.get_running_loop()
        timers = [
            loop.call_later(timeout, self._close_draining, timeout)
            for timeout in {c.route.drain_timeout for c in self.connections}
        ]
        try:
            await self.connections.wait_empty()
        finally:
            for timer in timers:
                timer.cancel()

    def _close_draining(self, timeout: float) -> None:
        for connection in self.connections:
            if connection.route.drain_timeout == timeout:
                connection.finish("drain_timeout")

    def close_all(self, reason: str) -> None:
        """Shutdown phase 3: end whatever is still open."""
        for connection in self.connections:
            connection.finish(reason, abort=True)
