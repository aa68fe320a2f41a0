"""A service's ``endpoints:`` list → ``Endpoint`` values, and which service ports they leave empty.

Kubernetes semantics (kube-proxy's EndpointSlice cache): a service port's endpoints are exactly
the addresses that carry its targetPort; an address that lacks it is simply not an endpoint of
that port. One address may be listed several times (in several EndpointSlices, or twice in
``lbd/v1``): it contributes the union of its ports. A port left with no endpoint is refused
like any port without endpoints (REJECT), which ``lbd check`` reports as a warning.
"""

from __future__ import annotations

from lbd.config import fields as f
from lbd.config.errors import FieldError
from lbd.config.model import Endpoint, Service, port_id
from lbd.config.semantics import CONDITION_KEYS, conditions

ENDPOINT_KEYS = ("address", "ports", "weight", *CONDITION_KEYS)

_port_number = f.int_between(1, 65535)
_weight = f.int_between(0, 1_000_000)


def read_endpoints(section: f.Section) -> tuple[Endpoint, ...]:
    """Every endpoint of a service section, an address listed twice merged into one."""
    merged: dict[str, tuple[Endpoint, str]] = {}
    for path, raw in section.items("endpoints"):
        if isinstance(raw, str):
            try:
                endpoint: Endpoint | None = Endpoint(f.unicast_address(raw))
            except FieldError as error:
                section.problems.add(path, str(error))
                endpoint = None
        else:
            endpoint = _endpoint(f.Section(raw, path, section.problems, ENDPOINT_KEYS))
        if endpoint is None:
            continue
        first = merged.get(endpoint.address)
        if first is None:
            merged[endpoint.address] = (endpoint, path)
        else:
            union = _union(first[0], endpoint, path, first[1], section.problems)
            merged[endpoint.address] = (union, first[1])
    return tuple(endpoint for endpoint, _ in merged.values())


def _union(
    first: Endpoint, again: Endpoint, path: str, first_path: str, problems: f.Problems
) -> Endpoint:
    """``first`` with the ports of ``again`` added; a port name given two numbers, or a weight or
    condition that differs, is a problem (which of the two would lbd mean?)."""
    ports = dict(first.ports)
    for name, number in again.ports:
        if ports.setdefault(name, number) != number:
            problems.add(
                f.join(f.join(path, "ports"), name),
                f"{again.address} has port {name} = {ports[name]} at {first_path}, here {number}",
            )
    if (again.weight, again.conditions) != (first.weight, first.conditions):
        problems.add(
            path,
            f"{again.address} is listed at {first_path} with another weight or other "
            "conditions; an address listed twice only adds ports",
        )
    return Endpoint(first.address, tuple(sorted(ports.items())), first.weight, first.conditions)


def _endpoint(section: f.Section) -> Endpoint | None:
    problems_before = section.problems.count
    address = section.get("address", f.unicast_address)
    ports_section = f.Section(
        section.raw("ports"), f.join(section.path, "ports"), section.problems, None
    )
    named: list[tuple[str, int]] = []
    for key, value in ports_section.values.items():
        key_path = f.join(ports_section.path, str(key))
        try:
            named.append((f.port_name(key), _port_number(value)))
        except FieldError as error:
            section.problems.add(key_path, str(error))
    weight = section.get("weight", _weight, 1)
    state = conditions(section)
    if section.problems.count != problems_before:
        return None
    return Endpoint(address=address, ports=tuple(sorted(named)), weight=weight, conditions=state)


def port_warnings(services: tuple[Service, ...]) -> list[str]:
    """A service port whose named targetPort no endpoint carries, while the service has
    endpoints: it refuses every connection, which is valid but rarely meant."""
    warnings: list[str] = []
    for service in services:
        if not service.endpoints or service.external_name is not None:
            continue
        for port in service.ports:
            target = port.target_port
            if isinstance(target, str) and all(
                e.port_named(target) is None for e in service.endpoints
            ):
                warnings.append(
                    f'{service.key} port {port_id(port)}: no endpoint has a port named "{target}"; '
                    "connections to it are refused"
                )
    return warnings
