"""YAML (``apiVersion: lbd/v1``) → ``Config``, with every problem reported as ``path: message``."""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass
from pathlib import Path

import structlog

from lbd.config import fields as f
from lbd.config.admin import ADMIN_KEYS, admin_section, workers_count
from lbd.config.checks import check_listeners
from lbd.config.endpoints import port_warnings, read_endpoints
from lbd.config.errors import ConfigError, FieldError, Problem
from lbd.config.faults import protocol_problems
from lbd.config.health import positive_duration
from lbd.config.kubesource import SOURCE_KEYS, read_source
from lbd.config.model import (
    API_VERSION,
    DEFAULT_SYNC_PERIOD,
    PROTOCOLS,
    SERVICE_TYPES,
    Config,
    Node,
    Protocol,
    Service,
    ServicePort,
    ServiceType,
    Skipped,
    Tunables,
)
from lbd.config.nodeports import allocate_node_ports
from lbd.config.release import release
from lbd.config.semantics import (
    DNS_KEYS,
    SEMANTIC_KEYS,
    dns_section,
    service_semantics,
    skip_reason,
)
from lbd.config.tunables import TUNABLE_KEYS, read_tunables
from lbd.config.yamlfile import parse_yaml_documents, read_config_file

TOP_KEYS = ("apiVersion", "node", "defaults", "services", "admin", "dns", "workers", *SOURCE_KEYS)
NODE_KEYS = (
    "name",
    "zone",
    "addresses",
    "nodePortRange",
    "proxyName",
    "manageAddresses",
    "syncPeriod",
)
SERVICE_KEYS = (
    "name",
    "namespace",
    "type",
    "clusterIP",
    "clusterIPs",
    "externalIPs",
    "loadBalancerIPs",
    "ports",
    "endpoints",
    *TUNABLE_KEYS,
    *SEMANTIC_KEYS,
)
PORT_KEYS = ("name", "protocol", "port", "targetPort", "nodePort")
DEFAULT_NODE_PORT_RANGE = (30000, 32767)
log = structlog.get_logger("lbd.config")

_port_number = f.int_between(1, 65535)
# Port 0 asks the kernel for a free port: for tests and ad-hoc runs, never for production.
_service_port_number = f.int_between(0, 65535)


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """What the command line adds to a file: who this node is, and which proxy it is."""

    node_name: str | None = None  # --node-name or NODE_NAME; replaces node.name
    proxy_name: str | None = None  # --proxy-name; replaces node.proxyName


def load_file(path: str | Path, options: LoadOptions | None = None) -> Config:
    source = str(path)
    return load_text(read_config_file(path), source, options)


def load_text(
    text: str | bytes, source: str = "<config>", options: LoadOptions | None = None
) -> Config:
    """An ``lbd/v1`` config, or Kubernetes manifests (Services, EndpointSlices, Nodes).

    Whatever the bytes, the only exception is ``ConfigError``: this is the boundary where
    input from outside becomes a config, and a hostile file must not become a traceback (nor
    stop the reload loop that calls this)."""
    try:
        return _load_text(text, source, options)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError([Problem("", f"{source}: nested too deeply")], source) from None
    except Exception as error:
        log.warning("config load failed unexpectedly", source=source, exc_info=True)
        message = f"{source}: cannot load: {type(error).__name__}: {f.show(str(error))}"
        raise ConfigError([Problem("", message)], source) from None


def _load_text(text: str | bytes, source: str, options: LoadOptions | None) -> Config:
    from lbd.config.kube import is_manifest, manifests_to_document

    documents: list[object] | None = parse_yaml_documents(text, source)
    assert documents is not None
    options = options or LoadOptions()
    document: object
    warnings: list[str] = []
    if is_manifest(documents):
        document = manifests_to_document(documents, options.node_name, source, warnings)
    elif len(documents) > 1:
        raise ConfigError(
            [Problem("", f"{source}: expected one YAML document, found {len(documents)}")], source
        )
    else:
        document = documents[0]
    problems = f.Problems()
    config = build_config(document, problems, options)
    # The raw documents are garbage now; let them go in pieces (lbd.config.release).
    garbage: list[object] = [documents, document]
    documents = document = None
    release(garbage)
    if problems.count or config is None:
        raise ConfigError(problems.all(), source)
    if warnings:
        config = dataclasses.replace(config, warnings=(*warnings, *config.warnings))
    return config


def build_config(
    document: object, problems: f.Problems, options: LoadOptions | None = None
) -> Config | None:
    options = options or LoadOptions()
    if not isinstance(document, dict):
        problems.add("", f"the document must be a mapping, got {f.type_name(document)}")
        return None
    top = f.Section(document, "", problems, TOP_KEYS)
    version = top.get("apiVersion", f.string)
    if not f.is_missing(version) and version != API_VERSION:
        problems.add("apiVersion", f"must be {API_VERSION!r}, got {f.show(version)}")
    node = _node(f.Section(top.raw("node"), "node", problems, NODE_KEYS), options)
    defaults = _defaults(f.Section(top.raw("defaults"), "defaults", problems, TUNABLE_KEYS))
    admin = admin_section(f.Section(top.raw("admin"), "admin", problems, ADMIN_KEYS))
    dns = dns_section(f.Section(top.raw("dns"), "dns", problems, DNS_KEYS))
    workers = top.get("workers", workers_count, 1)
    source, kubernetes = read_source(top)
    services: list[Service] = []
    paths: list[str] = []
    names: dict[str, str] = {}
    skipped: list[Skipped] = []
    for path, raw in top.items("services"):
        reason = skip_reason(raw, node.proxy_name)
        if reason is not None:
            name = raw.get("name") if isinstance(raw, dict) else None
            namespace = raw.get("namespace", "default") if isinstance(raw, dict) else "default"
            skipped.append(Skipped(f"{namespace}/{name}", reason))
            continue
        service = _service(f.Section(raw, path, problems, SERVICE_KEYS), defaults)
        if service is None:
            continue
        if service.key in names:
            problems.add(
                f"{path}.name", f"duplicate service {service.key} (first at {names[service.key]})"
            )
            continue
        names[service.key] = path
        services.append(service)
        paths.append(path)
    if problems.count:
        return None
    services = allocate_node_ports(services, paths, node.node_port_range, problems)
    if problems.count:
        return None
    config = Config(
        node=node,
        defaults=defaults,
        services=tuple(services),
        admin=admin,
        dns=dns,
        skipped=tuple(skipped),
        workers=workers,
        warnings=tuple(port_warnings(tuple(services))),
        source=source,
        kubernetes=kubernetes,
    )
    check_listeners(config, paths, problems)
    return config


def _node(section: f.Section, options: LoadOptions) -> Node:
    addresses = tuple(
        _item(section, path, raw, f.ip_address) for path, raw in section.items("addresses")
    )
    name = section.get("name", f.string, socket.gethostname())
    proxy_name = section.get("proxyName", f.string, "")
    return Node(
        name=options.node_name or name,
        proxy_name=options.proxy_name if options.proxy_name is not None else proxy_name,
        zone=section.get("zone", f.string, None),
        addresses=tuple(a for a in addresses if a) if section.has("addresses") else ("0.0.0.0",),
        node_port_range=section.get("nodePortRange", _port_range, DEFAULT_NODE_PORT_RANGE),
        manage_addresses=section.get("manageAddresses", f.boolean, False),
        sync_period=section.get("syncPeriod", positive_duration, DEFAULT_SYNC_PERIOD),
    )


def _defaults(section: f.Section) -> Tunables:
    return read_tunables(section, Tunables())


def _service(section: f.Section, defaults: Tunables) -> Service | None:
    problems_before = section.problems.count
    kind: ServiceType = section.get("type", f.one_of(SERVICE_TYPES), "ClusterIP")
    lb_ips = _addresses(section, "loadBalancerIPs")
    if lb_ips and kind != "LoadBalancer":
        section.problems.add(f.join(section.path, "loadBalancerIPs"), "only for type LoadBalancer")
    endpoints = read_endpoints(section)
    if kind == "ExternalName" and endpoints:
        section.problems.add(
            f.join(section.path, "endpoints"), "an ExternalName service's endpoints come from DNS"
        )
    ports = _ports(section, kind)
    name = section.get("name", f.dns_label)
    namespace = section.get("namespace", f.dns_label, "default")
    cluster_ip, cluster_ips = _cluster_ips(section)
    external_ips = _addresses(section, "externalIPs")
    tunables = read_tunables(section, defaults)
    if tunables.proxy_protocol == "v1" and any(p.protocol == "UDP" for p in ports):
        section.problems.add(
            f.join(section.path, "proxyProtocol"),
            "v1 carries TCP only; a service with a UDP port needs v2 (or a separate service)",
        )
    protocol_problems(section, {port.protocol for port in ports})
    semantics = service_semantics(section, kind, len(external_ips))
    service = Service(
        name=name,
        namespace=namespace,
        type=kind,
        cluster_ip=cluster_ip,
        cluster_ips=cluster_ips,
        external_ips=external_ips,
        load_balancer_ips=lb_ips,
        ports=ports,
        endpoints=endpoints,
        tunables=tunables,
        **semantics,
    )
    return service if section.problems.count == problems_before else None


def _ports(section: f.Section, kind: str) -> tuple[ServicePort, ...]:
    items = section.items("ports")
    if not items:
        section.problems.add(f.join(section.path, "ports"), "at least one port is required")
    ports: list[ServicePort] = []
    seen_names: dict[str, str] = {}
    seen_numbers: dict[tuple[str, int], str] = {}
    for path, raw in items:
        port_section = f.Section(raw, path, section.problems, PORT_KEYS)
        port = _port(port_section, kind, named=len(items) > 1)
        if port is None:
            continue
        if port.name is not None:
            if port.name in seen_names:
                section.problems.add(
                    f"{path}.name", f"duplicate port name (first at {seen_names[port.name]})"
                )
            seen_names[port.name] = path
        number_key = (port.protocol, port.port)
        if port.port and number_key in seen_numbers:
            section.problems.add(
                f"{path}.port",
                f"{port.protocol} port {port.port} already used by {seen_numbers[number_key]}",
            )
        seen_numbers[number_key] = path
        ports.append(port)
    return tuple(ports)


def _port(section: f.Section, kind: str, named: bool) -> ServicePort | None:
    problems_before = section.problems.count
    name = section.get("name", f.port_name, None)
    if named and name is None:
        section.problems.add(
            f.join(section.path, "name"), "required when a service has more than one port"
        )
    protocol: Protocol = section.get("protocol", f.one_of(PROTOCOLS), "TCP")
    number = section.get("port", _service_port_number)
    default_target: int | str | None = number if isinstance(number, int) and number > 0 else None
    target: int | str | None = section.get("targetPort", _target_port, default_target)
    if target is None and number == 0:
        section.problems.add(f.join(section.path, "targetPort"), "required when port is 0")
    node_port = section.get("nodePort", _port_number, None)
    if node_port is not None and kind == "ClusterIP":
        section.problems.add(
            f.join(section.path, "nodePort"),
            "only NodePort and LoadBalancer services have a nodePort",
        )
    if isinstance(target, str) and kind == "ExternalName":
        section.problems.add(
            f.join(section.path, "targetPort"), "an ExternalName service needs a numeric targetPort"
        )
    if section.problems.count != problems_before or target is None:
        return None
    return ServicePort(
        name=name,
        protocol=protocol,
        port=number,
        target_port=target,
        node_port=node_port,
    )


def _cluster_ips(section: f.Section) -> tuple[str, tuple[str, ...]]:
    """``clusterIP`` and ``clusterIPs`` as Kubernetes validates them: clusterIPs[0] is clusterIP,
    and a second address (dual-stack) is of the other family."""
    cluster_ip = section.get("clusterIP", f.unicast_address, None)
    cluster_ips = _addresses(section, "clusterIPs")
    path = f.join(section.path, "clusterIPs")
    families = {":" in address for address in cluster_ips}
    if len(cluster_ips) > 2 or len(families) < len(cluster_ips):
        section.problems.add(path, "at most two addresses, one IPv4 and one IPv6")
    if cluster_ip is None and not cluster_ips:
        if section.raw("clusterIP") is None:
            section.problems.add(f.join(section.path, "clusterIP"), "required")
        return "", ()
    if cluster_ip is not None and cluster_ips and cluster_ips[0] != cluster_ip:
        section.problems.add(path, f"the first address must be clusterIP ({cluster_ip})")
    return cluster_ip or cluster_ips[0], cluster_ips[:2] if len(cluster_ips) > 1 else ()


def _addresses(section: f.Section, key: str) -> tuple[str, ...]:
    found = [_item(section, path, raw, f.unicast_address) for path, raw in section.items(key)]
    return tuple(address for address in found if address)


def _item(section: f.Section, path: str, raw: object, parse: f.Parser[str]) -> str:
    try:
        return parse(raw)
    except FieldError as error:
        section.problems.add(path, str(error))
        return ""


def _target_port(value: object) -> int | str | None:
    if isinstance(value, str):
        return f.port_name(value)
    return _port_number(value)


def _port_range(value: object) -> tuple[int, int]:
    text = f.string(value)
    low_text, _, high_text = text.partition("-")
    try:
        low, high = int(low_text), int(high_text)
    except ValueError:
        raise FieldError(f"expected a range such as 30000-32767, got {f.show(text)}") from None
    if not 1 <= low <= high <= 65535:
        raise FieldError(f"expected 1 <= low <= high <= 65535, got {f.show(text)}")
    return (low, high)


__all__ = ["ConfigError", "LoadOptions", "Problem", "build_config", "load_file", "load_text"]
