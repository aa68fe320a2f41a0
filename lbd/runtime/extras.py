"""State a service has beyond its ports: ExternalName resolvers and health check servers.

Owned by the runtime and applied in its phases: ``prepare`` binds new health check sockets (a
failure changes nothing), ``commit`` (synchronous) closes what went away and re-points what
stays, ``start`` starts serving and resolving.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from lbd.config.model import Config, Service, port_id
from lbd.config.routes import RouteKey
from lbd.endpoints.route import Route
from lbd.health.node_port import HealthCheckServer
from lbd.observability.stats import ProcessStats
from lbd.runtime.dns import ExternalNameResolver

log = structlog.get_logger("lbd.runtime.runtime")

HealthKey = tuple[str, int]  # (node address, healthCheckNodePort)


def wanted_health_checks(config: Config) -> dict[HealthKey, str]:
    return {
        (address, service.health_check_node_port): service.key
        for service in config.services
        if service.health_check_node_port is not None
        for address in config.node.addresses
    }


class ServiceExtras:
    def __init__(
        self,
        routes: dict[RouteKey, Route],
        process: ProcessStats,
        pools_changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.routes = routes  # the runtime's own dict, read at use
        self.process = process
        self.pools_changed = pools_changed  # a resolver changed endpoints outside a reload
        self.resolvers: dict[str, ExternalNameResolver] = {}
        self.health: dict[HealthKey, HealthCheckServer] = {}
        self._services: dict[str, Service] = {}
        self._new_resolvers: list[ExternalNameResolver] = []

    def prepare(self, new: Config) -> list[HealthCheckServer]:
        """Bind the health check sockets the new config adds; OSError closes them all."""
        prepared: list[HealthCheckServer] = []
        try:
            for (address, port), service in wanted_health_checks(new).items():
                if (address, port) not in self.health:
                    prepared.append(
                        HealthCheckServer(
                            address, port, service, self._local_counter(service), self.process
                        )
                    )
        except OSError:
            for server in prepared:
                server.close()
            raise
        return prepared

    def commit(self, new: Config, prepared: list[HealthCheckServer]) -> None:
        wanted = wanted_health_checks(new)
        for where in [where for where in self.health if where not in wanted]:
            self.health.pop(where).close()
        for where, server in self.health.items():
            if server.service != wanted[where]:
                server.service = wanted[where]
                server.count = self._local_counter(wanted[where])
        self.health.update(((s.address, s.port), s) for s in prepared)
        self._services = {s.key: s for s in new.services}
        named = {s.key: s for s in new.services if s.external_name is not None}
        for key, resolver in list(self.resolvers.items()):
            service = named.get(key)
            if service is None or (service.external_name, new.dns) != (
                resolver.name,
                resolver.config,
            ):
                resolver.stop()
                del self.resolvers[key]
        for key, service in named.items():
            kept = self.resolvers.get(key)
            if kept is None:
                assert service.external_name is not None
                created = ExternalNameResolver(
                    key,
                    service.external_name,
                    new.dns,
                    self._ports_of(key),
                    self.process,
                    self.pools_changed,
                )
                self.resolvers[key] = created
                self._new_resolvers.append(created)
            else:
                kept.apply()  # ports or targetPorts may have changed

    async def start(self, prepared: list[HealthCheckServer]) -> None:
        for server in prepared:
            await server.start()
            log.info(
                "health check listening",
                listener=f"{server.address}:{server.port}",
                service=server.service,
            )
        for resolver in self._new_resolvers:
            resolver.start()
        self._new_resolvers.clear()

    def close(self) -> None:
        for resolver in self.resolvers.values():
            resolver.stop()
        self.resolvers.clear()
        for server in self.health.values():
            server.close()
        self.health.clear()

    def _ports_of(self, key: str) -> Callable[[], list[tuple[Route, int]]]:
        def ports() -> list[tuple[Route, int]]:
            service = self._services.get(key)
            if service is None:
                return []
            found = []
            for port in service.ports:
                route = self.routes.get((key, port_id(port)))
                if route is not None and isinstance(port.target_port, int):
                    found.append((route, port.target_port))
            return found

        return ports

    def _local_counter(self, key: str) -> Callable[[], int]:
        def count() -> int:
            """Ready endpoints of the service on this node (distinct addresses, any port)."""
            return len(
                {
                    endpoint.address
                    for (service, _), route in self.routes.items()
                    if service == key
                    for endpoint in route.pool.usable()
                    if endpoint.state.local and endpoint.state.ready
                }
            )

        return count
