"""What the admin API shows and changes, as plain functions of the runtime (no HTTP here).

Lookups raise ``NotFound`` (404) or ``BadRequest`` (400) with a message for the operator; the
server turns them into JSON errors.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import asdict

from lbd.admin import fault_views
from lbd.admin.lookup import BadRequest, Json, NotFound, find_route, routes_of
from lbd.endpoints.endpoint import UpstreamEndpoint, ineligible_reason
from lbd.endpoints.explain import explain
from lbd.endpoints.route import Route
from lbd.runtime.runtime import Runtime

__all__ = ["BadRequest", "Json", "NotFound", "call"]


def services_view(runtime: Runtime) -> Json:
    """Every service port: its listeners, its counters, and each endpoint's state."""
    listeners: dict[int, list[Json]] = {}
    for listener in runtime.listeners.values():
        host, port = listener.bound
        listeners.setdefault(id(listener.route), []).append(
            {
                "kind": listener.spec.kind,
                "protocol": listener.spec.protocol,
                "address": _host_port(host, port),
            }
        )
    return {
        "services": [
            _route_view(route, listeners.get(id(route), [])) for route in runtime.routes.values()
        ]
    }


def _route_view(route: Route, listeners: list[Json]) -> Json:
    stats = route.stats
    refusals = {reason: n for reason, n in asdict(stats.downstream_cx_refused_total).items() if n}
    return {
        "service": f"{route.namespace}/{route.service}",
        "port": route.port_name,
        "strategy": route.tunables.strategy,
        "listeners": listeners,
        "connections": {
            "active": stats.downstream_cx_active,
            "total": stats.downstream_cx_total,
            "refused": sum(refusals.values()),
            "refusedBy": refusals,
        },
        **({"sessions": _sessions_view(route)} if route.protocol == "UDP" else {}),
        **fault_views.route_faults(route),
        "endpoints": [
            _endpoint_view(route, endpoint)
            for endpoint in (*route.pool.members, *route.pool.draining)
        ],
    }


def _sessions_view(route: Route) -> Json:
    """A UDP port's client sessions (its ``connections`` stay 0: UDP has none)."""
    stats = route.stats
    return {
        "active": stats.udp_sess_active,
        "total": stats.udp_sess_total,
        "max": route.tunables.max_udp_sessions,
        "droppedBy": {r: n for r, n in asdict(stats.udp_sess_dropped_total).items() if n},
    }


def _endpoint_view(route: Route, endpoint: UpstreamEndpoint) -> Json:
    reason = ineligible_reason(endpoint)
    override: Json = {}
    if endpoint.admin_drained:
        override["drained"] = True
    if endpoint.weight_override is not None:
        override["weight"] = endpoint.weight_override
    return {
        "endpoint": str(endpoint),
        "address": endpoint.address,
        "port": endpoint.port,
        "state": reason or "eligible",
        "eligible": reason is None,
        "weight": endpoint.weight,
        "configWeight": endpoint.config_weight,
        "override": override or None,
        "active": endpoint.active,
        "total": endpoint.stats.upstream_cx_total,
        "health": _health(route, endpoint),
        "ejected": endpoint.ejected,  # by outlierDetection
    }


def _health(route: Route, endpoint: UpstreamEndpoint) -> str:
    """What the active checks last said; "unchecked" when the port has no healthCheck."""
    if route.tunables.health_check is None:
        return "unchecked"
    return "healthy" if endpoint.healthy else "unhealthy"


LISTENER_KINDS = ("clusterIP", "externalIP", "nodePort", "loadBalancerIP")


def call(runtime: Runtime, name: str, query: dict[str, str]) -> Json:
    """One admin view by name, with the request's query: what a supervisor asks a worker."""
    if name == "services":
        return services_view(runtime)
    if name == "explain":
        return explain_view(
            runtime,
            query.get("service", ""),
            query.get("port"),
            query.get("client"),
            query.get("kind", "clusterIP"),
        )
    if name in ("drain", "enable", "weight"):
        return endpoint_action(runtime, name, query)
    fault_call = fault_views.CALLS.get(name)
    if fault_call is not None:
        return fault_call(runtime, query)
    raise NotFound(f"no admin view {name!r}")


def endpoint_action(runtime: Runtime, action: str, query: dict[str, str]) -> Json:
    """``?service=NS/NAME&endpoint=ADDRESS[:PORT]`` (``&port=P`` to pick one service port;
    without it, every port of the service that has the endpoint). ``weight`` takes
    ``&weight=N`` (or ``config`` to drop the override)."""
    service, port, endpoint = query.get("service"), query.get("port"), query.get("endpoint")
    routes = [find_route(runtime, service, port)] if port else routes_of(runtime, service)
    changed: list[Json] = []
    for route in routes:
        try:
            targets = endpoint_targets(route, endpoint)
        except NotFound:
            if port:
                raise
            continue  # this port of the service has no such endpoint; another may
        if action == "weight":
            changed.append(set_weight(route, targets, query.get("weight")))
        else:
            changed.append(set_drained(route, targets, action == "drain"))
    if not changed:
        raise NotFound(f"service {service} has no endpoint {endpoint}")
    return {"action": action, "changed": changed}


def explain_view(
    runtime: Runtime, service: str, port: str | None, client: str | None, kind: str = "clusterIP"
) -> Json:
    """``kind``: the listener kind the connection arrives on (traffic policies and source
    ranges depend on it)."""
    route = find_route(runtime, service, port)
    if client:
        _parse_ip(client, "client")
    if kind not in LISTENER_KINDS:
        raise BadRequest(f"kind must be one of {', '.join(LISTENER_KINDS)}, got {kind!r}")
    verdicts = explain(
        route,
        client or "",
        external=kind != "clusterIP",
        filtered=kind == "loadBalancerIP",
        now=asyncio.get_running_loop().time(),
    )
    return {
        "service": f"{route.namespace}/{route.service}",
        "port": route.port_name,
        "client": client or None,
        "kind": kind,
        "strategy": route.tunables.strategy,
        "eligible": [str(v.endpoint) for v in verdicts if v.eligible],
        "endpoints": [
            {
                "endpoint": str(v.endpoint),
                "eligible": v.eligible,
                "reason": v.reason,
                "detail": v.detail,
                "weight": v.endpoint.weight,
                "active": v.endpoint.active,
            }
            for v in verdicts
        ],
    }


def endpoint_targets(route: Route, endpoint: str | None) -> list[UpstreamEndpoint]:
    """Members of ``route`` matching ``endpoint``: ``ADDRESS`` (every port) or ``ADDRESS:PORT``
    (``[IPv6]:PORT``)."""
    if not endpoint:
        raise BadRequest("endpoint is required (ADDRESS or ADDRESS:PORT)")
    address, port = _parse_endpoint(endpoint)
    found = route.pool.find(address, port)
    if not found:
        raise NotFound(
            f"service {route.namespace}/{route.service} port {route.port_name} "
            f"has no endpoint {endpoint}"
        )
    return found


def set_drained(route: Route, targets: list[UpstreamEndpoint], drained: bool) -> Json:
    for target in targets:
        route.pool.set_admin_drained(target, drained)
    return _changed(route, targets)


def set_weight(route: Route, targets: list[UpstreamEndpoint], weight: str | None) -> Json:
    """``weight`` a whole number 0-1000000, or ``config`` (or empty) to drop the override."""
    value: int | None = None
    if weight not in (None, "", "config"):
        try:
            value = int(weight)
        except ValueError:
            raise BadRequest(f"weight must be a whole number or 'config', got {weight!r}") from None
        if not 0 <= value <= 1_000_000:
            raise BadRequest(f"weight must be between 0 and 1000000, got {value}")
    for target in targets:
        route.pool.set_weight_override(target, value)
    return _changed(route, targets)


def _changed(route: Route, targets: list[UpstreamEndpoint]) -> Json:
    return {
        "service": f"{route.namespace}/{route.service}",
        "port": route.port_name,
        "endpoints": [_endpoint_view(route, target) for target in targets],
    }


def _parse_endpoint(text: str) -> tuple[str, int | None]:
    try:
        return str(ipaddress.ip_address(text)), None
    except ValueError:
        pass  # not a bare address: ADDRESS:PORT below
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise BadRequest(f"endpoint must be ADDRESS or ADDRESS:PORT, got {text!r}")
    return _parse_ip(host.strip("[]"), "endpoint"), int(port_text)


def _parse_ip(text: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise BadRequest(f"{what} must be an IP address, got {text!r}") from None


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
