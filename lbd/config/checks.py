"""Checks across services: no two listeners may claim the same socket."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from lbd.config.fields import Problems
from lbd.config.model import Config, ListenerSpec, listeners_of


@dataclass
class _PortClaims:
    """The listeners already seen on one (protocol, port)."""

    by_address: dict[str, tuple[ListenerSpec, str]] = field(default_factory=dict)
    # per IP version: the wildcard listener, and any one specific listener
    wildcard: dict[int, tuple[ListenerSpec, str]] = field(default_factory=dict)
    specific: dict[int, tuple[ListenerSpec, str]] = field(default_factory=dict)


def check_listeners(config: Config, paths: list[str], problems: Problems) -> None:
    """Two listeners conflict on the same protocol and port when their addresses are equal, or
    when one is the wildcard of the other's family (the kernel refuses to bind both). IPv6
    listeners are bound IPV6_V6ONLY, so ``::`` never covers IPv4. Linear in the listeners: a
    config with thousands of services on one port number must still reload fast."""
    claims: dict[tuple[str, int], _PortClaims] = {}
    for service, path in zip(config.services, paths, strict=True):
        for spec in listeners_of(service, config.node):
            if spec.port == 0:
                continue  # the kernel picks a distinct port for each
            where = f"{path}.ports[{spec.port_index}]"
            seen = claims.setdefault((spec.protocol, spec.port), _PortClaims())
            address = ipaddress.ip_address(spec.address)
            version = address.version
            if address.is_unspecified:
                other = seen.wildcard.get(version) or seen.specific.get(version)
            else:
                other = seen.by_address.get(spec.address) or seen.wildcard.get(version)
            if other is not None:
                other_spec, other_where = other
                problems.add(
                    where,
                    f"{spec.kind} listener {spec.describe()} conflicts with the "
                    f"{other_spec.kind} listener {other_spec.describe()} of {other_spec.service} "
                    f"({other_where})",
                )
                continue
            seen.by_address[spec.address] = (spec, where)
            if address.is_unspecified:
                seen.wildcard[version] = (spec, where)
            else:
                seen.specific.setdefault(version, (spec, where))
