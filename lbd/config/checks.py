"""Checks across services: no two listeners may claim the same socket."""

from __future__ import annotations

import ipaddress

from lbd.config.fields import Problems
from lbd.config.model import Config, ListenerSpec, listeners_of


def check_listeners(config: Config, paths: list[str], problems: Problems) -> None:
    """Two listeners conflict on the same protocol and port when their addresses are equal, or
    when one is the wildcard of the other's family (the kernel refuses to bind both)."""
    by_port: dict[tuple[str, int], list[tuple[ListenerSpec, str]]] = {}
    for service, path in zip(config.services, paths, strict=True):
        for spec in listeners_of(service, config.node):
            if spec.port == 0:
                continue  # the kernel picks a distinct port for each
            where = f"{path}.ports[{spec.port_index}]"
            for other, other_where in by_port.get((spec.protocol, spec.port), []):
                if _overlap(spec.address, other.address):
                    problems.add(
                        where,
                        f"{spec.kind} listener {spec.describe()} conflicts with the "
                        f"{other.kind} listener {other.describe()} of {other.service} "
                        f"({other_where})",
                    )
                    break
            by_port.setdefault((spec.protocol, spec.port), []).append((spec, where))


def _overlap(a: str, b: str) -> bool:
    if a == b:
        return True
    first, second = ipaddress.ip_address(a), ipaddress.ip_address(b)
    if first.version != second.version:
        return False  # IPv6 listeners are bound IPV6_V6ONLY, so :: never covers IPv4
    return first.is_unspecified or second.is_unspecified
