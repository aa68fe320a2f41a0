"""What each service port asks of the data path, as plain comparable values.

A ``RouteSpec`` is derived from the config once; the runtime builds or updates a live Route from
it, and the reload diff compares specs, so "did this service port change?" has one answer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from lbd.config.model import (
    READY,
    Conditions,
    Config,
    Node,
    Protocol,
    Service,
    ServicePort,
    Tunables,
    port_id,
)

RouteKey = tuple[str, str]  # (namespace/name, port id)


@dataclass(frozen=True, slots=True)
class EndpointState:
    """What the data path needs of an endpoint's conditions, resolved against this node once
    per config: kube-proxy's categories (ready / serving-terminating) and its topology."""

    ready: bool = True
    serving: bool = True
    terminating: bool = False
    local: bool = False  # nodeName is this node
    same_zone: bool = False  # zone is this node's zone


READY_STATE = EndpointState()
Target = tuple[str, int, int, EndpointState]  # (address, port, weight, state)


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """Which endpoints each kind of listener may use (lbd.endpoints.topology applies it)."""

    internal_local: bool = False  # internalTrafficPolicy: Local (clusterIP listeners)
    external_local: bool = False  # externalTrafficPolicy: Local (every other listener)
    prefer_close: bool = False  # trafficDistribution: PreferClose


CLUSTER = TrafficPolicy()


@dataclass(frozen=True, slots=True)
class RouteSpec:
    namespace: str
    service: str
    port_name: str
    protocol: Protocol
    targets: tuple[Target, ...]
    tunables: Tunables = field(default_factory=Tunables)
    policy: TrafficPolicy = CLUSTER
    affinity_timeout: int | None = None  # sessionAffinity ClientIP, seconds
    source_ranges: tuple[str, ...] = ()  # loadBalancerSourceRanges (loadBalancerIP listeners)
    external_name: str | None = None  # targets come from resolving this name, not the config

    @property
    def key(self) -> RouteKey:
        return (f"{self.namespace}/{self.service}", self.port_name)

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.service}:{self.port_name}"


def endpoint_state(conditions: Conditions, node: Node, publish_not_ready: bool) -> EndpointState:
    if publish_not_ready:  # publishNotReadyAddresses: every endpoint counts as ready
        conditions = dataclasses.replace(conditions, ready=True, serving=True, terminating=False)
    if conditions == READY:
        return READY_STATE
    return EndpointState(
        ready=conditions.ready,
        serving=conditions.serving,
        terminating=conditions.terminating,
        local=conditions.node_name is not None and conditions.node_name == node.name,
        same_zone=conditions.zone is not None and conditions.zone == node.zone,
    )


def endpoint_targets(service: Service, port: ServicePort, node: Node) -> tuple[Target, ...]:
    """(address, port, weight, state) of every endpoint that serves this port."""
    targets: list[Target] = []
    for endpoint in service.endpoints:
        number = endpoint.target_port(port.target_port)
        if number is not None:
            state = endpoint_state(endpoint.conditions, node, service.publish_not_ready)
            targets.append((endpoint.address, number, endpoint.weight, state))
    return tuple(targets)


def route_spec(service: Service, port: ServicePort, node: Node) -> RouteSpec:
    return RouteSpec(
        namespace=service.namespace,
        service=service.name,
        port_name=port_id(port),
        protocol=port.protocol,
        targets=endpoint_targets(service, port, node),
        tunables=service.tunables,
        policy=TrafficPolicy(
            internal_local=service.internal_traffic_policy == "Local",
            external_local=service.external_traffic_policy == "Local",
            prefer_close=service.prefer_close,
        ),
        affinity_timeout=service.affinity_timeout,
        source_ranges=service.source_ranges,
        external_name=service.external_name,
    )


def route_specs(config: Config) -> dict[RouteKey, RouteSpec]:
    specs = (
        route_spec(service, port, config.node)
        for service in config.services
        for port in service.ports
    )
    return {spec.key: spec for spec in specs}
