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

import os
import re
import socket
from typing import Any

import structlog

from lbd.config import fields as f
from lbd.config.errors import ConfigError, FieldError

log = structlog.get_logger("lbd.config")

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
_PORT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def is_manifest(documents: list[object]) -> bool:
    first = documents[0]
    return isinstance(first, dict) and "kind" in first


def manifests_to_document(
    documents: list[object], node_name: str | None, source: str = "<manifests>"
) -> Document:
    """The ``lbd/v1`` document for these objects; a ConfigError naming each bad field."""
    problems = f.Problems()
    objects = _flatten(documents, problems)
    node_name = node_name or os.environ.get("NODE_NAME") or socket.gethostname()
    services: list[tuple[str, dict[str, Any]]] = []
    slices: list[tuple[str, dict[str, Any]]] = []
    node: Document = {"name": node_name}
    for path, obj in objects:
        kind, version = obj.get("kind"), obj.get("apiVersion")
        if (kind, version) == ("Service", "v1"):
            services.append((path, obj))
        elif (kind, version) == ("EndpointSlice", "discovery.k8s.io/v1"):
            slices.append((path, obj))
        elif (kind, version) == ("Node", "v1"):
            if _meta(obj).get("name") == node_name:
                node.update(_node(obj))
        else:
            problems.add(
                f.join(path, "kind"),
                f"expected a v1 Service, a discovery.k8s.io/v1 EndpointSlice or a v1 Node, "
                f"got {version}/{kind}",
            )
    converted = [_service(path, obj, problems) for path, obj in services]
    by_key = {key: service for key, service in converted if service is not None}
    for path, obj in slices:
        _add_slice(path, obj, by_key, problems)
    if problems.count:
        raise ConfigError(problems.all(), source)
    for service in by_key.values():
        service.pop("_slicePorts", None)
        service["endpoints"] = list(service["endpoints"].values())
    return {"apiVersion": "lbd/v1", "node": node, "services": list(by_key.values())}


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


def _node(obj: dict[str, Any]) -> Document:
    node: Document = {}
    labels = _meta(obj).get("labels") or {}
    if isinstance(labels, dict) and ZONE_LABEL in labels:
        node["zone"] = labels[ZONE_LABEL]
    status = obj.get("status") or {}
    addresses = [
        item["address"]
        for item in status.get("addresses") or []
        if isinstance(item, dict) and item.get("type") in ("InternalIP", "ExternalIP")
    ]
    if addresses:
        node["addresses"] = addresses
    return node


def _service(path: str, obj: dict[str, Any], problems: f.Problems) -> tuple[str, Document | None]:
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
    if "clusterIP" not in service and isinstance(cluster_ips, list) and cluster_ips:
        service["clusterIP"] = cluster_ips[0]
    lb_ips = [spec.values["loadBalancerIP"]] if spec.values.get("loadBalancerIP") else []
    ingress = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    lb_ips += [i["ip"] for i in ingress if isinstance(i, dict) and i.get("ip")]
    if lb_ips and service.get("type") == "LoadBalancer":
        service["loadBalancerIPs"] = list(dict.fromkeys(lb_ips))
    external = service.get("type") == "ExternalName"
    ports, slice_ports = [], {}
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
            slice_ports[(port.values.get("name") or "", converted.get("protocol", "TCP"))] = key
        ports.append(converted)
    service["ports"] = ports
    service["endpoints"] = {}
    service["_slicePorts"] = slice_ports
    return f"{namespace}/{name}", service


def _target_key(name: object, number: object, index: int) -> str:
    """A name for the endpoint ports of one service port: its own name when lbd accepts it as a
    port name (15 characters), else one made from its position."""
    if isinstance(name, str) and name:
        try:
            return f.port_name(name)
        except FieldError:
            return f"port-{index}"
    return f"port-{number}" if isinstance(number, int) else f"port-{index}"


def _add_slice(
    path: str, obj: dict[str, Any], services: dict[str, Document], problems: f.Problems
) -> None:
    f.Section(obj, path, problems, SLICE_KEYS)
    meta = _meta(obj)
    owner = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    service = services.get(f"{meta.get('namespace', 'default')}/{owner}")
    if service is None:
        return  # a slice of a service that is not in the input (or is skipped): nothing to serve
    if obj.get("addressType") not in ("IPv4", "IPv6"):
        log.warning("endpointslice ignored", slice=meta.get("name"), reason="addressType FQDN")
        return
    numbers: dict[str, int] = {}
    for port_path, raw in f.Section(obj, path, problems, None).items("ports"):
        if not isinstance(raw, dict):
            problems.add(port_path, "expected a mapping")
            continue
        key = service["_slicePorts"].get((raw.get("name") or "", raw.get("protocol", "TCP")))
        if key is not None and isinstance(raw.get("port"), int):
            numbers[key] = raw["port"]
    endpoints: dict[str, Document] = service["endpoints"]
    for ep_path, raw in f.Section(obj, path, problems, None).items("endpoints"):
        endpoint = f.Section(raw, ep_path, problems, SLICE_ENDPOINT_KEYS)
        addresses = endpoint.values.get("addresses") or []
        if not isinstance(addresses, list) or not addresses:
            problems.add(f.join(ep_path, "addresses"), "expected a list of at least one address")
            continue
        # Kubernetes: consumers use the first address only.
        address = str(addresses[0])
        existing = endpoints.get(address)
        if existing is not None:
            existing["ports"].update(
                {k: v for k, v in numbers.items() if k not in existing["ports"]}
            )
            continue
        converted: Document = {"address": address, "ports": dict(numbers)}
        conditions = endpoint.values.get("conditions") or {}
        for key in ("ready", "serving", "terminating"):
            if isinstance(conditions, dict) and conditions.get(key) is not None:
                converted[key] = conditions[key]
        for key in ("nodeName", "zone"):
            if endpoint.values.get(key) is not None:
                converted[key] = endpoint.values[key]
        endpoints[address] = converted
