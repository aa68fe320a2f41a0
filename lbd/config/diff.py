"""Old config vs new config → what a reload has to do. Pure: no sockets, no state.

Listeners are matched by the socket they need (protocol, address, port), so a listener whose
address and port did not change keeps its socket even when it now feeds another service port.
Service ports are matched by (namespace/name, port name or number); endpoints by (address, port).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from lbd.config.model import Config, ListenerSpec, listeners_of
from lbd.config.routes import RouteKey, RouteSpec, route_specs
from lbd.config.tunables import changed_tunables


@dataclass(frozen=True, slots=True)
class RouteChange:
    key: RouteKey
    endpoints_added: tuple[str, ...]
    endpoints_removed: tuple[str, ...]
    weights_changed: tuple[str, ...]  # or conditions (ready, serving, terminating, topology)
    settings_changed: tuple[str, ...]  # tunables' lbd/v1 keys, other RouteSpec fields


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    listeners_added: tuple[ListenerSpec, ...] = ()
    listeners_removed: tuple[ListenerSpec, ...] = ()
    listeners_repointed: tuple[ListenerSpec, ...] = ()  # same socket, new service port or kind
    routes_added: tuple[RouteSpec, ...] = ()
    routes_removed: tuple[RouteSpec, ...] = ()
    routes_changed: tuple[RouteChange, ...] = ()

    @property
    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))

    @property
    def endpoints_added(self) -> int:
        return sum(len(c.endpoints_added) for c in self.routes_changed) + sum(
            len(r.targets) for r in self.routes_added
        )

    @property
    def endpoints_removed(self) -> int:
        """Endpoints that start draining: removed from a kept port or with their port."""
        return sum(len(c.endpoints_removed) for c in self.routes_changed) + sum(
            len(r.targets) for r in self.routes_removed
        )

    def summary(self) -> dict[str, int]:
        return {
            "listeners_added": len(self.listeners_added),
            "listeners_removed": len(self.listeners_removed),
            "listeners_repointed": len(self.listeners_repointed),
            "service_ports_added": len(self.routes_added),
            "service_ports_removed": len(self.routes_removed),
            "service_ports_changed": len(self.routes_changed),
            "endpoints_added": self.endpoints_added,
            "endpoints_draining": self.endpoints_removed,
        }

    def describe(self) -> list[str]:
        """One line per change, for people (``lbd check --diff``)."""
        lines = [
            f"+ listener {s.describe()} ({s.kind} of {_port(s.route_key)})"
            for s in self.listeners_added
        ]
        lines += [
            f"- listener {s.describe()} ({s.kind} of {_port(s.route_key)})"
            for s in self.listeners_removed
        ]
        lines += [
            f"~ listener {s.describe()} now {s.kind} of {_port(s.route_key)} (socket kept)"
            for s in self.listeners_repointed
        ]
        for spec in self.routes_added:
            lines.append(f"+ service port {_port(spec.key)} with {len(spec.targets)} endpoints")
        for spec in self.routes_removed:
            lines.append(
                f"- service port {_port(spec.key)}: {len(spec.targets)} endpoints start draining"
            )
        for change in self.routes_changed:
            where = _port(change.key)
            lines += [f"+ endpoint {e} of {where}" for e in change.endpoints_added]
            lines += [
                f"- endpoint {e} of {where} (starts draining)" for e in change.endpoints_removed
            ]
            lines += [
                f"~ endpoint {e} of {where}: weight or conditions changed"
                for e in change.weights_changed
            ]
            if change.settings_changed:
                lines.append(f"~ {where}: {', '.join(change.settings_changed)} changed")
        return lines


def _port(key: RouteKey) -> str:
    return f"{key[0]}:{key[1]}"


def _endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def listener_specs(config: Config) -> dict[tuple[object, ...], ListenerSpec]:
    return {
        spec.identity: spec
        for service in config.services
        for spec in listeners_of(service, config.node)
    }


def diff_configs(old: Config, new: Config) -> ConfigDiff:
    old_listeners, new_listeners = listener_specs(old), listener_specs(new)
    old_routes, new_routes = route_specs(old), route_specs(new)
    changes = [
        change
        for key in old_routes.keys() & new_routes.keys()
        if (change := _route_change(old_routes[key], new_routes[key])) is not None
    ]
    return ConfigDiff(
        listeners_added=tuple(s for k, s in new_listeners.items() if k not in old_listeners),
        listeners_removed=tuple(s for k, s in old_listeners.items() if k not in new_listeners),
        listeners_repointed=tuple(
            s
            for k, s in new_listeners.items()
            if k in old_listeners
            and (old_listeners[k].route_key, old_listeners[k].kind) != (s.route_key, s.kind)
        ),
        routes_added=tuple(s for k, s in new_routes.items() if k not in old_routes),
        routes_removed=tuple(s for k, s in old_routes.items() if k not in new_routes),
        routes_changed=tuple(sorted(changes, key=lambda c: c.key)),
    )


def _route_change(old: RouteSpec, new: RouteSpec) -> RouteChange | None:
    if old == new:
        return None
    # Weight and conditions together: a change of either is "this endpoint changed".
    before = {(a, p): (w, state) for a, p, w, state in old.targets}
    after = {(a, p): (w, state) for a, p, w, state in new.targets}
    settings = changed_tunables(old.tunables, new.tunables) + tuple(
        f.name
        for f in fields(RouteSpec)
        if f.name not in ("targets", "tunables") and getattr(old, f.name) != getattr(new, f.name)
    )
    return RouteChange(
        key=new.key,
        endpoints_added=tuple(_endpoint(*k) for k in after if k not in before),
        endpoints_removed=tuple(_endpoint(*k) for k in before if k not in after),
        weights_changed=tuple(
            _endpoint(*k) for k in after if k in before and before[k] != after[k]
        ),
        settings_changed=settings,
    )
