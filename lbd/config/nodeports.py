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
        for index, port in enumerate(service.ports):
            if port.node_port is None:
                continue
            where = f"{path}.ports[{index}].nodePort"
            if not low <= port.node_port <= high:
                problems.add(where, f"{port.node_port} is outside nodePortRange {low}-{high}")
            key = (port.protocol, port.node_port)
            if key in taken:
                problems.add(
                    where, f"{port.protocol} nodePort {port.node_port} already used by {taken[key]}"
                )
            taken[key] = where
    if problems.items:
        return services
    allocated: list[Service] = []
    for service, path in sorted(zip(services, paths, strict=True), key=lambda pair: pair[0].key):
        allocated.append(_allocate_service(service, path, low, high, taken, problems))
    order = {service.key: i for i, service in enumerate(services)}
    return sorted(allocated, key=lambda service: order[service.key])


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
    for index, port in enumerate(ports):
        if port.node_port is not None:
            continue
        identity = f"{service.key}/{port.name or port.port}/{port.protocol}"
        size = high - low + 1
        first = int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "big") % size
        for step in range(size):
            candidate = low + (first + step) % size
            if (port.protocol, candidate) not in taken:
                taken[(port.protocol, candidate)] = f"{path}.ports[{index}] (allocated)"
                ports[index] = dataclasses.replace(port, node_port=candidate)
                break
        else:
            problems.add(
                f"{path}.ports[{index}].nodePort", f"no free nodePort left in {low}-{high}"
            )
    return dataclasses.replace(service, ports=tuple(ports))
