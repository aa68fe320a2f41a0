"""``Config`` → the effective config as a plain document (for ``GET /config``).

The document uses the file's own vocabulary and is itself a valid ``lbd/v1`` config (YAML is a
superset of JSON) that loads back to an equal model: every tunable of ``defaults`` and of each
service is written out (``lbd.config.tunables.TUNABLES``), and omitted NodePorts appear as
allocated, so what an operator reads is exactly what lbd runs. The admin token never appears,
only the path of its file.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from lbd.config.model import API_VERSION, READY, Admin, Config, Dns, Endpoint, Service, ServicePort
from lbd.config.release import release
from lbd.config.tunables import render_tunables

Document = dict[str, Any]


def render_config(config: Config) -> Document:
    node = config.node
    return {
        "apiVersion": API_VERSION,
        "node": {
            "name": node.name,
            **({"zone": node.zone} if node.zone is not None else {}),
            "addresses": list(node.addresses),
            "nodePortRange": f"{node.node_port_range[0]}-{node.node_port_range[1]}",
            **({"proxyName": node.proxy_name} if node.proxy_name else {}),
            "manageAddresses": node.manage_addresses,
            "syncPeriod": node.sync_period,
        },
        "admin": _admin(config.admin),
        "defaults": render_tunables(config.defaults),
        **({"dns": _dns(config.dns)} if config.dns != Dns() else {}),
        "workers": config.workers,
        "services": [_service(service) for service in config.services],
    }


def _dns(dns: Dns) -> Document:
    return {
        "servers": [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in dns.servers],
        "minTtl": dns.min_ttl,
        "maxTtl": dns.max_ttl,
        "timeout": dns.timeout,
    }


def config_hash(config: Config) -> str:
    """A short digest of the effective config: equal configs (whatever their comments, order of
    keys or spelling of defaults) give equal hashes.

    Encoded a service at a time: one ``json.dumps`` of a 10,000-service document is a single C
    call that holds the GIL for ~150 ms, stalling the event loop while a reload plans in a
    thread; one service at a time lets it run in between."""
    document = render_config(config)
    services = document.pop("services")
    digest = hashlib.sha256(_canonical(document))
    for service in services:
        digest.update(_canonical(service))
    garbage: list[object] = [services]
    del services
    release(garbage)  # the rendered documents, in pieces too
    return digest.hexdigest()[:16]


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _admin(admin: Admin) -> Document:
    where: Document = (
        {"socket": admin.socket} if admin.socket is not None else {"address": admin.describe()}
    )
    token: Document = {"tokenFile": admin.token_file} if admin.token_file is not None else {}
    return {"enabled": admin.enabled, **where, **token}


def _service(service: Service) -> Document:
    document: Document = {
        "name": service.name,
        "namespace": service.namespace,
        "type": service.type,
        "clusterIP": service.cluster_ip,
        "externalIPs": list(service.external_ips),
    }
    if service.cluster_ips:
        document["clusterIPs"] = list(service.cluster_ips)
    if service.type == "LoadBalancer":
        document["loadBalancerIPs"] = list(service.load_balancer_ips)
    document["ports"] = [_port(port) for port in service.ports]
    document["endpoints"] = [_endpoint(endpoint) for endpoint in service.endpoints]
    document.update(render_tunables(service.tunables))
    document.update(_semantics(service))
    return document


def _semantics(service: Service) -> Document:
    """The Kubernetes fields, only where they differ from Kubernetes' defaults."""
    document: Document = {}
    if service.labels:
        document["labels"] = dict(service.labels)
    if service.affinity_timeout is not None:
        document["sessionAffinity"] = "ClientIP"
        document["sessionAffinityConfig"] = {
            "clientIP": {"timeoutSeconds": service.affinity_timeout}
        }
    if service.internal_traffic_policy != "Cluster":
        document["internalTrafficPolicy"] = service.internal_traffic_policy
    if service.external_traffic_policy != "Cluster":
        document["externalTrafficPolicy"] = service.external_traffic_policy
    if service.prefer_close:
        document["trafficDistribution"] = "PreferClose"
    if service.publish_not_ready:
        document["publishNotReadyAddresses"] = True
    if service.source_ranges:
        document["loadBalancerSourceRanges"] = list(service.source_ranges)
    if service.health_check_node_port is not None:
        document["healthCheckNodePort"] = service.health_check_node_port
    if service.external_name is not None:
        document["externalName"] = service.external_name
    return document


def _port(port: ServicePort) -> Document:
    document: Document = {"name": port.name} if port.name is not None else {}
    document.update({"protocol": port.protocol, "port": port.port, "targetPort": port.target_port})
    if port.node_port is not None:
        document["nodePort"] = port.node_port
    return document


def _endpoint(endpoint: Endpoint) -> Document:
    document: Document = {
        "address": endpoint.address,
        "ports": dict(endpoint.ports),
        "weight": endpoint.weight,
    }
    state = endpoint.conditions
    if state != READY:
        document.update({"ready": state.ready, "serving": state.serving})
        document["terminating"] = state.terminating
        if state.node_name is not None:
            document["nodeName"] = state.node_name
        if state.zone is not None:
            document["zone"] = state.zone
    return document
