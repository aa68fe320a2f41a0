"""Kubernetes objects shaped as the API server serves them (v1 Service, discovery.k8s.io/v1
EndpointSlice, v1 Node): the fields a real cluster fills in, not only the ones lbd reads."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

Obj = dict[str, Any]
_generation = itertools.count(1)


def _meta(name: str, namespace: str | None, **extra: Any) -> Obj:
    meta: Obj = {
        "name": name,
        "uid": str(uuid.uuid4()),
        "creationTimestamp": "2024-05-01T10:00:00Z",
    }
    if namespace is not None:
        meta["namespace"] = namespace
    meta.update({k: v for k, v in extra.items() if v is not None})
    return meta


def service(
    name: str,
    cluster_ip: str | list[str],
    ports: list[Obj] | None = None,
    *,
    namespace: str = "default",
    kind: str = "ClusterIP",
    annotations: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    **spec: Any,
) -> Obj:
    """A Service; ``ports`` items are ``{"name", "port", "targetPort", "protocol"}``."""
    ips = cluster_ip if isinstance(cluster_ip, list) else [cluster_ip]
    families = ["IPv6" if ":" in ip else "IPv4" for ip in ips]
    body: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, namespace, annotations=annotations, labels=labels),
        "spec": {
            "clusterIP": ips[0],
            "clusterIPs": ips,
            "internalTrafficPolicy": "Cluster",
            "ipFamilies": families,
            "ipFamilyPolicy": "RequireDualStack" if len(ips) > 1 else "SingleStack",
            "ports": [
                {"protocol": "TCP", "targetPort": p.get("port"), **p}
                for p in (ports or [{"name": "http", "port": 80}])
            ],
            "selector": {"app": name},
            "sessionAffinity": "None",
            "type": kind,
            **spec,
        },
        "status": {"loadBalancer": {}},
    }
    return body


def endpoint_slice(
    name: str,
    service_name: str,
    addresses: list[str],
    ports: list[Obj],
    *,
    namespace: str = "default",
    address_type: str | None = None,
    ready: bool = True,
    node_name: str = "node-a",
    zone: str | None = None,
) -> Obj:
    """An EndpointSlice of ``service_name`` with one endpoint per address; ``ports`` items are
    ``{"name", "port", "protocol"}``."""
    family = address_type or ("IPv6" if addresses and ":" in addresses[0] else "IPv4")
    endpoints = []
    for index, address in enumerate(addresses):
        endpoint: Obj = {
            "addresses": [address],
            "conditions": {"ready": ready, "serving": ready, "terminating": False},
            "nodeName": node_name,
            "targetRef": {
                "kind": "Pod",
                "name": f"{service_name}-{index}",
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
            },
        }
        if zone is not None:
            endpoint["zone"] = zone
        endpoints.append(endpoint)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": _meta(
            name,
            namespace,
            generateName=f"{service_name}-",
            labels={
                "kubernetes.io/service-name": service_name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
            annotations={
                "endpoints.kubernetes.io/last-change-trigger-time": "2024-05-01T10:00:00Z"
            },
            ownerReferences=[
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": service_name,
                    "uid": str(uuid.uuid4()),
                    "blockOwnerDeletion": True,
                    "controller": True,
                }
            ],
        ),
        "addressType": family,
        "endpoints": endpoints,
        "ports": [{"protocol": "TCP", **p} for p in ports],
    }


def node(name: str, addresses: list[str], zone: str | None = None) -> Obj:
    labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}
    if zone is not None:
        labels["topology.kubernetes.io/zone"] = zone
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": _meta(name, None, labels=labels),
        "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]},
        "status": {
            "addresses": [{"type": "InternalIP", "address": a} for a in addresses]
            + [{"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def listing(*objects: Obj) -> Obj:
    """``kubectl get -o json``'s ``kind: List``."""
    return {"apiVersion": "v1", "kind": "List", "items": list(objects), "metadata": {}}
