"""Kubernetes manifests → an ``lbd/v1`` document, which the ordinary loader then validates.

Input is what ``kubectl get services,endpointslices -A -o yaml`` prints (a ``kind: List``), or a
multi-document YAML of ``v1`` Services, ``discovery.k8s.io/v1`` EndpointSlices and optionally
``v1`` Nodes (kube-proxy reads its own Node for its addresses and zone). Converting to the same
document ``lbd convert`` prints means one loader, one model and one set of checks for both.

Endpoints reach a service port the way kube-proxy finds them: an EndpointSlice port with the
same name and protocol as the service port carries the number, per slice. lbd's per-endpoint
named ports express exactly that, so each converted service port targets a port name and each
endpoint lists the numbers its slices gave it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lbd.config import fields as f
from lbd.config.annotations import read_annotations
from lbd.config.errors import ConfigError, FieldError

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ZONE_LABEL = "topology.kubernetes.io/zone"
Document = dict[str, Any]

# Service spec fields: the ones lbd reads, and the ones that do not change what a node proxy
# does (docs/kubernetes.md says why for each). Anything else is an error, as in lbd/v1.
SPEC_USED = (
    "type",
    "clusterIP",
    "clusterIPs",
    "externalIPs",
    "ports",
    "sessionAffinity",
    "sessionAffinityConfig",
    "internalTrafficPolicy",
    "externalTrafficPolicy",
    "trafficDistribution",
    "publishNotReadyAddresses",
    "loadBalancerSourceRanges",
    "loadBalancerIP",
    "healthCheckNodePort",
    "externalName",
)
SPEC_IGNORED = (
    "selector",
    "ipFamilies",
    "ipFamilyPolicy",
    "allocateLoadBalancerNodePorts",
    "loadBalancerClass",
)
SPEC_PORT_KEYS = ("name", "protocol", "port", "targetPort", "nodePort", "appProtocol")
SLICE_KEYS = ("apiVersion", "kind", "metadata", "addressType", "endpoints", "ports")
SLICE_ENDPOINT_KEYS = (
    "addresses",
    "conditions",
    "nodeName",
    "zone",
    "hints",
    "targetRef",
    "hostname",
    "deprecatedTopology",
)


def is_manifest(documents: list[object]) -> bool:
    first = documents[0]
    return isinstance(first, dict) and "kind" in first


def manifests_to_document(
    documents: list[object],
    node_name: str | None,
    source: str = "<manifests>",
    warnings: list[str] | None = None,
) -> Document:
    """The ``lbd/v1`` document for these objects; a ConfigError naming each bad field.
    What is skipped but not wrong (a slice of an address family the service does not have)
    is appended to ``warnings``."""
    problems = f.Problems()
    warnings = warnings if warnings is not None else []
    objects = _flatten(documents, problems)
    node_name = node_name or os.environ.get("NODE_NAME") or socket.gethostname()
    services: list[ConvertedService] = []
    slices: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    node: Document = {"name": node_name}
    for path, obj in objects:
        kind, version = obj.get("kind"), obj.get("apiVersion")
        if (kind, version) == ("Service", "v1"):
            services.append(convert_service(path, obj, problems))
        elif (kind, version) == ("EndpointSlice", "discovery.k8s.io/v1"):
            f.Section(obj, path, problems, SLICE_KEYS)
            slices.setdefault(slice_owner(obj), []).append((path, obj))
        elif (kind, version) == ("Node", "v1"):
            if _meta(obj).get("name") == node_name:
                node.update(node_fields(obj))
        else:
            problems.add(
                f.join(path, "kind"),
                f"expected a v1 Service, a discovery.k8s.io/v1 EndpointSlice or a v1 Node, "
                f"got {version}/{kind}",
            )
    converted = {service.key: service for service in services}
    documents_out = [
        with_endpoints(service, slices.get(key, ()), problems, warnings)
        for key, service in converted.items()
    ]
    if problems.count:
        raise ConfigError(problems.all(), source)
    return {"apiVersion": "lbd/v1", "node": node, "services": documents_out}


def _flatten(documents: list[object], problems: f.Problems) -> list[tuple[str, dict[str, Any]]]:
    objects: list[tuple[str, dict[str, Any]]] = []
    for index, document in enumerate(documents):
        path = f"documents[{index}]" if len(documents) > 1 else ""
        if not isinstance(document, dict):
            problems.add(path, f"expected a Kubernetes object, got {f.type_name(document)}")
            continue
        if document.get("kind") == "List":
            items = f.Section(document, path, problems, None).items("items")
            objects += [(p, item) for p, item in items if isinstance(item, dict)]
        else:
            objects.append((path, document))
    return objects


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def slice_owner(obj: dict[str, Any]) -> str:
    """``namespace/name`` of the service an EndpointSlice belongs to (its service-name label)."""
    meta = _meta(obj)
    labels = meta.get("labels")
    owner = labels.get(SERVICE_NAME_LABEL) if isinstance(labels, dict) else None
    return f"{meta.get('namespace', 'default')}/{owner}"


def node_fields(
    obj: dict[str, Any], address_types: tuple[str, ...] = ("InternalIP", "ExternalIP")
) -> Document:
    """``node.zone`` and ``node.addresses`` (of ``address_types``) from a v1 Node (kube-proxy
    reads its own)."""
    node: Document = {}
    labels = _meta(obj).get("labels") or {}
    if isinstance(labels, dict) and ZONE_LABEL in labels:
        node["zone"] = labels[ZONE_LABEL]
    status = obj.get("status") or {}
    addresses = [
        item["address"]
        for item in (status.get("addresses") or [] if isinstance(status, dict) else [])
        if isinstance(item, dict) and item.get("type") in address_types
    ]
    if addresses:
        node["addresses"] = addresses
    return node


@dataclass(frozen=True, slots=True)
class ConvertedService:
    """A v1 Service as an ``lbd/v1`` service without endpoints, and what its slices need."""

    key: str  # namespace/name
    document: Document
    slice_ports: dict[tuple[str, str], str]  # (port name, protocol) -> endpoint port key
    families: frozenset[str]  # address types of its clusterIPs; empty: not known, take any
    annotations: dict[str, str]  # lbd/v1 key -> the annotation it came from


def convert_service(path: str, obj: dict[str, Any], problems: f.Problems) -> ConvertedService:
    meta = _meta(obj)
    name, namespace = meta.get("name"), meta.get("namespace", "default")
    spec = f.Section(obj.get("spec"), f.join(path, "spec"), problems, (*SPEC_USED, *SPEC_IGNORED))
    service: Document = {"name": name, "namespace": namespace}
    if meta.get("labels"):
        service["labels"] = meta["labels"]
    for key in SPEC_USED:
        if key in spec.values and key not in ("ports", "clusterIPs", "loadBalancerIP"):
            service[key] = spec.values[key]
    cluster_ips = spec.values.get("clusterIPs")
    if isinstance(cluster_ips, list) and cluster_ips:
        service.setdefault("clusterIP", cluster_ips[0])
        if len(cluster_ips) > 1:
            service["clusterIPs"] = cluster_ips
    lb_ips = [spec.values["loadBalancerIP"]] if spec.values.get("loadBalancerIP") else []
    status = obj.get("status")
    balancer = status.get("loadBalancer") if isinstance(status, dict) else None
    ingress = (balancer.get("ingress") if isinstance(balancer, dict) else None) or []
    lb_ips += [i["ip"] for i in ingress if isinstance(i, dict) and i.get("ip")]
    if lb_ips and service.get("type") == "LoadBalancer":
        service["loadBalancerIPs"] = list(dict.fromkeys(lb_ips))
    external = service.get("type") == "ExternalName"
    ports: list[Document] = []
    slice_ports: dict[tuple[str, str], str] = {}
    for index, (port_path, raw) in enumerate(spec.items("ports")):
        port = f.Section(raw, port_path, problems, SPEC_PORT_KEYS)
        converted = {
            k: port.values[k] for k in ("name", "protocol", "port", "nodePort") if k in port.values
        }
        if converted.get("protocol", "TCP") not in ("TCP", "UDP"):
            problems.add(f.join(port_path, "protocol"), "only TCP and UDP are supported")
        if external:
            converted["targetPort"] = port.values.get("targetPort", port.values.get("port"))
        else:
            # The slices give each endpoint its number under this service port's name.
            key = _target_key(port.values.get("name"), converted.get("port"), index)
            converted["targetPort"] = key
            port_name, protocol = port.values.get("name") or "", converted.get("protocol", "TCP")
            slice_ports[(str(port_name), str(protocol))] = key
        ports.append(converted)
    service["ports"] = ports
    annotations = read_annotations(f.join(path, "metadata.annotations"), meta, service, problems)
    return ConvertedService(
        f"{namespace}/{name}", service, slice_ports, _families(service), annotations
    )


def _families(service: Document) -> frozenset[str]:
    found = set()
    for address in service.get("clusterIPs") or [service.get("clusterIP")]:
        # Not an address (None, headless, a typo): the loader says so.
        with contextlib.suppress(ValueError):
            found.add(f"IPv{ipaddress.ip_address(str(address)).version}")
    return frozenset(found)


def _target_key(name: object, number: object, index: int) -> str:
    """A name for the endpoint ports of one service port: its own name when lbd accepts it as a
    port name (15 characters), else one made from its position."""
    if isinstance(name, str) and name:
        try:
            return f.port_name(name)
        except FieldError:
            return f"port-{index}"
    return f"port-{number}" if isinstance(number, int) else f"port-{index}"


def with_endpoints(
    service: ConvertedService,
    slices: Iterable[tuple[str, dict[str, Any]]],
    problems: f.Problems,
    warnings: list[str],
) -> Document:
    """The service's ``lbd/v1`` document with the endpoints of all its slices merged as
    kube-proxy merges them: per service port, the endpoints whose slice carries that port; an
    address in several slices has the union of their ports (and is ready if any says so)."""
    endpoints: dict[str, Document] = {}
    for path, obj in slices:
        address_type = obj.get("addressType")
        if address_type not in ("IPv4", "IPv6"):
            warnings.append(
                f"{path}: EndpointSlice {_meta(obj).get('name')} ignored: "
                f"addressType {address_type} (lbd proxies IPv4 and IPv6 only)"
            )
            continue
        if service.families and address_type not in service.families:
            warnings.append(
                f"{path}: EndpointSlice {_meta(obj).get('name')} ignored: {service.key} has no "
                f"{address_type} clusterIP"
            )
            continue
        _add_slice(path, obj, service.slice_ports, endpoints, problems)
    return {**service.document, "endpoints": list(endpoints.values())}


def _add_slice(
    path: str,
    obj: dict[str, Any],
    slice_ports: dict[tuple[str, str], str],
    endpoints: dict[str, Document],
    problems: f.Problems,
) -> None:
    numbers: dict[str, int] = {}
    for port_path, raw in f.Section(obj, path, problems, None).items("ports"):
        if not isinstance(raw, dict):
            problems.add(port_path, "expected a mapping")
            continue
        key = slice_ports.get((raw.get("name") or "", raw.get("protocol", "TCP")))
        if key is not None and isinstance(raw.get("port"), int):
            numbers[key] = raw["port"]
    for ep_path, raw in f.Section(obj, path, problems, None).items("endpoints"):
        endpoint = f.Section(raw, ep_path, problems, SLICE_ENDPOINT_KEYS)
        addresses = endpoint.values.get("addresses") or []
        if not isinstance(addresses, list) or not addresses:
            problems.add(f.join(ep_path, "addresses"), "expected a list of at least one address")
            continue
        # Kubernetes: consumers use the first address only.
        address = str(addresses[0])
        converted: Document = {"address": address, "ports": dict(numbers)}
        conditions = endpoint.values.get("conditions") or {}
        for key in ("ready", "serving", "terminating"):
            if isinstance(conditions, dict) and conditions.get(key) is not None:
                converted[key] = conditions[key]
        for key in ("nodeName", "zone"):
            if endpoint.values.get(key) is not None:
                converted[key] = endpoint.values[key]
        existing = endpoints.get(address)
        if existing is not None:
            # kube-proxy keeps one endpoint per address: the ready one when they differ.
            ports = {**numbers, **existing["ports"]}
            if converted.get("ready", True) and not existing.get("ready", True):
                existing = converted
            converted = {**existing, "ports": ports}
        endpoints[address] = converted
