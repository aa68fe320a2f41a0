"""The one owner of a worker's live state: routes, listeners and connections.

Start-up and reload are the same operation, ``apply(config)``, in three phases:

1. prepare: bind every new listener (not yet accepting). Any failure closes what was bound and
   raises; nothing running has been touched, so a bad reload changes nothing.
2. commit: synchronously (no await, so no connection sees half of it) update routes in place,
   re-point kept listeners, close removed ones, and mark connections that must drain.
3. serve: new listeners start accepting.

An unchanged listener keeps its socket and its accept queue; an identical config is a no-op.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import random
import socket

import structlog

from lbd import __version__
from lbd.config.diff import ConfigDiff
from lbd.config.model import Config, ListenerSpec
from lbd.config.routes import RouteKey, RouteSpec
from lbd.endpoints.route import Route
from lbd.health.node_port import HealthCheckServer
from lbd.health.registry import HealthRegistry
from lbd.net import udp_faults
from lbd.net.addresses import NodeAddresses
from lbd.net.connections import ConnectionSet
from lbd.net.listener import Listener as NetListener
from lbd.net.netlink import NetlinkFailure
from lbd.net.sockets import InheritedSockets
from lbd.net.tcp_listener import TcpListener
from lbd.net.tcp_proxy import Downstream
from lbd.net.udp_listener import UdpListener
from lbd.observability.snapshot import Snapshot, read_stats
from lbd.observability.stats import KubernetesStats, ProcessStats
from lbd.runtime.extras import ServiceExtras
from lbd.runtime.listeners import Listener
from lbd.runtime.plan import Plan, make_plan
from lbd.runtime.snapshot import kubernetes_snapshot, runtime_snapshot
from lbd.runtime.status import ReloadStatus
from lbd.shm.counts import EndpointSlots

log = structlog.get_logger("lbd.runtime.runtime")


class ListenerError(Exception):
    """A listener could not be bound; names the listener and the service."""


LIMIT_KEYS = frozenset({"maxConnections", "maxConnectionsPerEndpoint"})
FAULT_KEYS = frozenset({"faults", "mirror"})


def _moves_connections(diff: ConfigDiff) -> bool:
    """Whether some open connection may start (or stop) draining: an endpoint, a port or a
    listener went away (or an endpoint came back)."""
    return bool(
        diff.routes_removed
        or diff.listeners_removed
        or diff.listeners_repointed
        or any(c.endpoints_added or c.endpoints_removed for c in diff.routes_changed)
    )


def empty_like(config: Config) -> Config:
    """``config`` without services: what a runtime has applied before it starts."""
    return dataclasses.replace(config, services=(), warnings=())


class Runtime:
    def __init__(
        self,
        config: Config,
        rng: random.Random | None = None,
        *,
        sockets: InheritedSockets | None = None,
        slots: EndpointSlots | None = None,
        udp_reuse_port: bool = False,
        shared_listeners: bool = False,
    ) -> None:
        # Several workers, or a restart: listening sockets someone else bound, taken by
        # (protocol, address, port) before binding a new one.
        self.sockets = sockets
        self.slots = slots  # several workers: active counts shared through these slots
        self.udp_reuse_port = udp_reuse_port  # several workers: each binds its UDP listeners
        # Several workers: the supervisor keeps every copy of each TCP listening socket, so a
        # worker REJECTs by shutdown() of its copies, not by closing them (lbd.net.tcp_listener).
        self.shared_listeners = shared_listeners
        self.config = empty_like(config)  # what is applied; start() applies `config`
        self._initial = config
        self._rng = rng
        self.process = ProcessStats(build_info=(__version__, platform.python_version()))
        self.specs: dict[RouteKey, RouteSpec] = {}
        self._set_config(make_plan(self.config, {}, self.config))
        self.ready = False  # listeners bound and the config applied; False again at shutdown
        self.connections: ConnectionSet[Downstream] = ConnectionSet()
        # partial, not a lambda: no Python frame per accepted connection
        self._downstream = functools.partial(Downstream, self.connections)
        self.routes: dict[RouteKey, Route] = {}
        self.listeners: dict[tuple[object, ...], Listener] = {}
        self.health = HealthRegistry(rng)
        self.reloads = ReloadStatus()  # written by the Reloader, read by /healthz
        self.extras = ServiceExtras(self.routes, self.process, self.sync_health)
        # node.manageAddresses: the service addresses on the node. One owner per node: not a
        # worker that shares its supervisor's listeners.
        self.addresses = None if shared_listeners else NodeAddresses(self._draining_addresses)
        # lbd run --kubernetes: the API source's counters, and whether it has synced once
        self.kubernetes: KubernetesStats | None = None

    async def start(self) -> None:
        """Bind every listener of the initial config, or none."""
        await self.apply(self._initial)
        self.ready = True

    def plan(self, new: Config) -> Plan:
        """What applying ``new`` takes. Safe to call in another thread (a reload does): it
        reads only the immutable config and specs that run now."""
        return make_plan(self.config, self.specs, new)

    async def apply(self, new: Config | Plan) -> ConfigDiff:
        """Apply a config (or a plan made for the config that runs now) in three phases."""
        plan = new if isinstance(new, Plan) else self.plan(new)
        if plan.base is not self.config:  # another apply came in between: plan again
            plan = self.plan(plan.config)
        new, diff = plan.config, plan.diff
        await self._prepare_addresses(new)
        for warning in sorted(set(new.warnings) - set(self.config.warnings)):
            log.warning("config warning", warning=warning)
        if diff.empty:
            # e.g. the admin section (takes effect on restart), dns, or a healthCheckNodePort
            node_checks = self._prepare_extras(new, [])
            self._set_config(plan)
            self.extras.commit(new, node_checks)
            if self.addresses is not None:
                self.addresses.commit(new)
            await self.extras.start(node_checks)
            return diff
        # Routes for new service ports exist before commit so new listeners can point at them;
        # nothing reaches them until the listeners start serving.
        added = {spec.key: Route(spec, self._rng, self.slots) for spec in diff.routes_added}
        prepared = await self._prepare(diff.listeners_added, {**self.routes, **added})
        node_checks = self._prepare_extras(new, prepared)  # healthCheckNodePort servers
        self._commit(plan, prepared, added)
        self.extras.commit(new, node_checks)
        if self.addresses is not None:
            self.addresses.commit(new)
        for listener in prepared:
            await listener.start()
        await self.extras.start(node_checks)
        for skipped in new.skipped:
            log.info("service skipped", service=skipped.service, reason=skipped.reason)
        for listener in prepared:
            log.info(
                "listening",
                listener=listener.describe(),
                kind=listener.spec.kind,
                route=listener.route.label,
                strategy=listener.route.tunables.strategy,
                endpoints=len(listener.route.pool.members),
            )
        return diff

    async def _prepare_addresses(self, new: Config) -> None:
        """Service addresses go on the node before the listeners that need them bind."""
        if self.addresses is None:
            return
        try:
            await self.addresses.prepare(new)
        except NetlinkFailure as error:
            raise ListenerError(f"node.manageAddresses: {error}") from None

    def _draining_addresses(self) -> set[str]:
        """The local addresses open client connections use (they keep an address on)."""
        local = (c.local_address() for c in self.connections)
        return {address for address in local if address}

    async def release_addresses(self, keep: bool) -> None:
        """On exit, after the drain: the service addresses come off, unless ``keep`` (a
        successor serves them now)."""
        if self.addresses is not None:
            await self.addresses.release(keep)

    def _prepare_extras(self, new: Config, prepared: list[Listener]) -> list[HealthCheckServer]:
        try:
            return self.extras.prepare(new)
        except OSError as error:
            for listener in prepared:
                listener.close()
            self.process.listener_bind_failures_total += 1
            raise ListenerError(
                f"cannot bind a healthCheckNodePort: {error.strerror or error}"
            ) from None

    async def _prepare(
        self, specs: tuple[ListenerSpec, ...], routes: dict[RouteKey, Route]
    ) -> list[Listener]:
        prepared: list[Listener] = []
        try:
            for spec in specs:
                route = routes[spec.route_key]
                listener = Listener(spec, self._net_listener(spec, route))
                try:
                    await listener.net.prepare()
                except OSError as error:
                    self.process.listener_bind_failures_total += 1
                    raise ListenerError(
                        f"cannot bind {spec.describe()} ({spec.kind} of {spec.service}): "
                        f"{error.strerror or error}"
                    ) from None
                prepared.append(listener)
        except BaseException:
            for listener in prepared:
                listener.close()
            raise
        return prepared

    def _net_listener(self, spec: ListenerSpec, route: Route) -> NetListener:
        if spec.protocol == "UDP":
            return UdpListener(
                spec.address,
                spec.port,
                route,
                external=spec.external,
                filtered=spec.filtered,
                reuse_port=self.udp_reuse_port,
                inherited=self._inherited(spec),
            )
        return TcpListener(
            spec.address,
            spec.port,
            route,
            self._downstream,
            external=spec.external,
            filtered=spec.filtered,
            inherited=self._inherited(spec),
            copies=self.sockets.take_copies(spec.identity) if self.sockets is not None else [],
            shared=self.shared_listeners,
        )

    def _inherited(self, spec: ListenerSpec) -> socket.socket | None:
        """A listening socket someone else bound for this spec (supervisor, restart), if any."""
        return self.sockets.take(spec.identity) if self.sockets is not None else None

    def _commit(self, plan: Plan, prepared: list[Listener], added: dict[RouteKey, Route]) -> None:
        """Synchronous, and proportional to what changed (not to the size of the config)."""
        diff, specs = plan.diff, plan.specs
        changed = [self.routes[change.key] for change in diff.routes_changed]
        for change, route in zip(diff.routes_changed, changed, strict=True):
            route.update(specs[change.key], self._rng)
            if FAULT_KEYS.intersection(change.settings_changed):
                self.follow_faults(route)
        self.routes.update(added)
        for removed in diff.routes_removed:
            route = self.routes.pop(removed.key)
            route.removed = True
            route.pool.drain_all()
            self.health.sync(route.pool, None)
        for spec in diff.listeners_removed:
            listener = self.listeners.pop(spec.identity)
            listener.close()
            log.info("listener closed", listener=listener.describe(), route=listener.route.label)
        for spec in diff.listeners_repointed:
            self.listeners[spec.identity].repoint(spec, self.routes[spec.route_key])
        for listener in prepared:
            self.listeners[listener.spec.identity] = listener
        self._set_config(plan)
        if _moves_connections(diff):
            self._mark_draining()
        if any(LIMIT_KEYS.intersection(change.settings_changed) for change in diff.routes_changed):
            for connection in self.connections:  # limits a reload turned on count them too
                connection.count_under_new_limits()
        for route in (*changed, *added.values()):
            self.health.sync(route.pool, route.tunables.health_check, route.faults)

    def follow_faults(self, route: Route) -> None:
        """The port's faults changed: its health probes and its open UDP sessions take them, or
        drop them, at once (a TCP connection takes faults when it connects)."""
        self.health.sync(route.pool, route.tunables.health_check, route.faults)
        for listener in self.listeners.values():
            if listener.route is route and isinstance(listener.net, UdpListener):
                udp_faults.follow(listener.net.sessions, route.faults)

    def _mark_draining(self) -> None:
        """Connections whose endpoint, service port or listener is gone drain; a connection
        whose endpoint came back before its deadline stops draining."""
        for connection in self.connections:
            endpoint = connection.endpoint
            gone = (
                connection.listener.removed
                or connection.route.removed
                or (endpoint is not None and endpoint.draining)
            )
            if gone:
                connection.start_draining(connection.route.tunables.drain_timeout)
            else:
                connection.stop_draining()

    def listener_for(self, service: str, port_index: int = 0, kind: str = "clusterIP") -> Listener:
        for listener in self.listeners.values():
            spec = listener.spec
            if spec.service == service and spec.port_index == port_index and spec.kind == kind:
                return listener
        raise KeyError((service, port_index, kind))

    def _set_config(self, plan: Plan) -> None:
        self.config = plan.config
        self.specs = plan.specs
        self.config_hash = plan.hash
        self.process.config_info = (plan.hash,)

    def metrics_snapshot(self) -> Snapshot:
        snapshot = runtime_snapshot(
            self.routes.values(), self.connections, self.process, self.health.stats
        )
        if self.addresses is not None:
            read_stats(snapshot, "node", self.addresses.stats, ())
        if self.kubernetes is not None:
            kubernetes_snapshot(snapshot, self.kubernetes)
        return snapshot

    def sync_health(self) -> None:
        """Start the checkers of new endpoints, stop those of removed ones: after ``start``
        and after every reload that changed a pool or a route's ``health_check``."""
        for route in self.routes.values():
            self.health.sync(route.pool, route.tunables.health_check, route.faults)

    def stop_accepting(self) -> None:
        """Shutdown phase 1: close every listening socket and stop the health checks; open
        connections carry on."""
        self.ready = False
        self.health.close()
        if self.addresses is not None:
            self.addresses.stop_watching()
        for listener in self.listeners.values():
            listener.close()
        self.extras.close()

    async def drain(self) -> None:
        """Shutdown phase 2: every connection may finish within its service's drainTimeout, and
        is closed then. Returns when none is left."""
        for connection in self.connections:
            connection.start_draining(connection.route.tunables.drain_timeout)
        await self.connections.wait_empty()

    def close_all(self, reason: str) -> None:
        """Shutdown phase 3: end whatever is still open."""
        for connection in self.connections:
            connection.finish(reason, abort=True)
        for lingering in list(self.connections.lingering):  # mirrors' last copies
            lingering.abort()
