"""NodePort allocation for ports that leave ``nodePort`` out.

Deterministic: the same config gives the same ports on every node and across restarts and
reloads, because a port's first choice is a hash of its identity (not of its position in the
file), and collisions probe forward in a fixed order.
"""

from __future__ import annotations

import dataclasses
import hashlib

from lbd.config.fields import Problems
from lbd.config.model import Service


def allocate_node_ports(
    services: list[Service], paths: list[str], node_port_range: tuple[int, int], problems: Problems
) -> list[Service]:
    low, high = node_port_range
    taken: dict[tuple[str, int], str] = {}
    for service, path in zip(services, paths, strict=True):
        for protocol, number, where in _explicit(service, path):
            if not low <= number <= high:
                problems.add(where, f"{number} is outside nodePortRange {low}-{high}")
            key = (protocol, number)
            if key in taken:
                problems.add(where, f"{protocol} nodePort {number} already used by {taken[key]}")
            taken[key] = where
    if problems.count:
        return services
    allocated: list[Service] = []
    for service, path in sorted(zip(services, paths, strict=True), key=lambda pair: pair[0].key):
        allocated.append(_allocate_service(service, path, low, high, taken, problems))
    order = {service.key: i for i, service in enumerate(services)}
    return sorted(allocated, key=lambda service: order[service.key])


def _explicit(service: Service, path: str) -> list[tuple[str, int, str]]:
    """(protocol, port, path) the file gave: nodePorts, and the healthCheckNodePort (TCP, from
    the same range, as the Kubernetes API server allocates it)."""
    found: list[tuple[str, int, str]] = [
        (port.protocol, port.node_port, f"{path}.ports[{index}].nodePort")
        for index, port in enumerate(service.ports)
        if port.node_port is not None
    ]
    if service.health_check_node_port is not None:
        found.append(("TCP", service.health_check_node_port, f"{path}.healthCheckNodePort"))
    return found


def _first_choice(identity: str, size: int) -> int:
    return int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "big") % size


def _free(
    identity: str, protocol: str, low: int, size: int, taken: dict[tuple[str, int], str]
) -> int | None:
    first = _first_choice(identity, size)
    for step in range(size):
        candidate = low + (first + step) % size
        if (protocol, candidate) not in taken:
            return candidate
    return None


def _allocate_service(
    service: Service,
    path: str,
    low: int,
    high: int,
    taken: dict[tuple[str, int], str],
    problems: Problems,
) -> Service:
    if service.type not in ("NodePort", "LoadBalancer"):
        return service
    ports = list(service.ports)
    size = high - low + 1
    if (
        service.external_traffic_policy == "Local"
        and service.type == "LoadBalancer"
        and service.health_check_node_port is None
    ):
        found = _free(f"{service.key}/healthCheckNodePort", "TCP", low, size, taken)
        if found is None:
            problems.add(f"{path}.healthCheckNodePort", f"no free port left in {low}-{high}")
        else:
            taken[("TCP", found)] = f"{path}.healthCheckNodePort (allocated)"
            service = dataclasses.replace(service, health_check_node_port=found)
    for index, port in enumerate(ports):
        if port.node_port is not None:
            continue
        identity = f"{service.key}/{port.name or port.port}/{port.protocol}"
        found = _free(identity, port.protocol, low, size, taken)
        if found is None:
            problems.add(
                f"{path}.ports[{index}].nodePort", f"no free nodePort left in {low}-{high}"
            )
            continue
        taken[(port.protocol, found)] = f"{path}.ports[{index}] (allocated)"
        ports[index] = dataclasses.replace(port, node_port=found)
    return dataclasses.replace(service, ports=tuple(ports))
