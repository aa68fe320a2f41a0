"""What each service port asks of the data path, as plain comparable values.

A ``RouteSpec`` is derived from the config once; the runtime builds or updates a live Route from
it, and the reload diff compares specs, so "did this service port change?" has one answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lbd.config.model import (
    Config,
    HealthCheck,
    Limits,
    OutlierDetection,
    ProxyProtocol,
    Service,
    ServicePort,
    StrategyName,
    port_id,
)

RouteKey = tuple[str, str]  # (namespace/name, port id)
Target = tuple[str, int, int]  # (address, port, weight)


@dataclass(frozen=True, slots=True)
class RouteSpec:
    namespace: str
    service: str
    port_name: str
    protocol: str
    strategy: StrategyName
    connect_timeout: float
    idle_timeout: float
    drain_timeout: float
    access_log: bool
    udp_idle_timeout: float
    max_udp_sessions: int
    targets: tuple[Target, ...]
    health_check: HealthCheck | None = None
    outlier_detection: OutlierDetection | None = None
    slow_start: float = 0.0
    limits: Limits = field(default_factory=Limits)
    half_closed_timeout: float = 60.0
    max_duration: float | None = None
    proxy_protocol: ProxyProtocol = field(default_factory=ProxyProtocol)

    @property
    def key(self) -> RouteKey:
        return (f"{self.namespace}/{self.service}", self.port_name)

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.service}:{self.port_name}"


def endpoint_targets(service: Service, port: ServicePort) -> tuple[Target, ...]:
    """(address, port, weight) of every endpoint that serves this port."""
    targets: list[Target] = []
    for endpoint in service.endpoints:
        number = endpoint.target_port(port.target_port)
        if number is not None:
            targets.append((endpoint.address, number, endpoint.weight))
    return tuple(targets)


def route_spec(service: Service, port: ServicePort) -> RouteSpec:
    return RouteSpec(
        namespace=service.namespace,
        service=service.name,
        port_name=port_id(port),
        protocol=port.protocol,
        strategy=service.strategy,
        connect_timeout=service.timeouts.connect,
        idle_timeout=service.timeouts.idle,
        drain_timeout=service.timeouts.drain,
        access_log=service.access_log,
        udp_idle_timeout=service.timeouts.udp_idle,
        max_udp_sessions=service.max_udp_sessions,
        targets=endpoint_targets(service, port),
        health_check=service.health_check,
        outlier_detection=service.outlier_detection,
        slow_start=service.slow_start,
        limits=service.limits,
        half_closed_timeout=service.timeouts.half_closed,
        max_duration=service.timeouts.max_duration,
        proxy_protocol=service.proxy_protocol,
    )


def route_specs(config: Config) -> dict[RouteKey, RouteSpec]:
    specs = (route_spec(service, port) for service in config.services for port in service.ports)
    return {spec.key: spec for spec in specs}
