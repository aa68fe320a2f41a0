"""The Kubernetes Service fields beyond ports and endpoints, read from one service's section.

Kept apart from ``loader`` so that the list of Service fields (docs/kubernetes.md) maps to one
small module. Every rule here is Kubernetes' own validation, with Kubernetes' defaults.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from lbd.config import fields as f
from lbd.config.durations import parse_duration
from lbd.config.errors import FieldError
from lbd.config.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    LABEL_HEADLESS,
    LABEL_PROXY_NAME,
    TRAFFIC_POLICIES,
    Conditions,
    Dns,
)

SEMANTIC_KEYS = (
    "sessionAffinity",
    "sessionAffinityConfig",
    "internalTrafficPolicy",
    "externalTrafficPolicy",
    "trafficDistribution",
    "publishNotReadyAddresses",
    "loadBalancerSourceRanges",
    "healthCheckNodePort",
    "externalName",
    "labels",
)
CONDITION_KEYS = ("ready", "serving", "terminating", "nodeName", "zone")
DNS_KEYS = ("servers", "minTtl", "maxTtl", "timeout")
_DNS_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\.?")
_affinity_seconds = f.int_between(1, 86400)


def service_semantics(section: f.Section, kind: str, external_ips: int) -> dict[str, Any]:
    """Keyword arguments for ``Service`` (the fields listed in ``SEMANTIC_KEYS``)."""
    path = section.path
    problems = section.problems
    affinity = section.get("sessionAffinity", f.one_of(("None", "ClientIP")), "None")
    timeout = _affinity_timeout(section)
    if section.has("sessionAffinityConfig") and affinity != "ClientIP":
        problems.add(f.join(path, "sessionAffinityConfig"), "only with sessionAffinity: ClientIP")
    itp = section.get("internalTrafficPolicy", f.one_of(TRAFFIC_POLICIES), "Cluster")
    etp = section.get("externalTrafficPolicy", f.one_of(TRAFFIC_POLICIES), "Cluster")
    externally_reachable = kind in ("NodePort", "LoadBalancer") or external_ips > 0
    if section.has("externalTrafficPolicy") and not externally_reachable:
        problems.add(
            f.join(path, "externalTrafficPolicy"),
            "only for NodePort and LoadBalancer services, or services with externalIPs",
        )
    ranges = tuple(
        network
        for item_path, raw in section.items("loadBalancerSourceRanges")
        if (network := _item(section, item_path, raw, cidr))
    )
    if ranges and kind != "LoadBalancer":
        problems.add(f.join(path, "loadBalancerSourceRanges"), "only for type LoadBalancer")
    health_port = section.get("healthCheckNodePort", f.int_between(1, 65535), None)
    if health_port is not None and not (kind == "LoadBalancer" and etp == "Local"):
        problems.add(
            f.join(path, "healthCheckNodePort"),
            "only for LoadBalancer services with externalTrafficPolicy: Local",
        )
    external_name = section.get("externalName", dns_name, None)
    if kind == "ExternalName" and external_name is None and not section.has("externalName"):
        problems.add(f.join(path, "externalName"), "required for type ExternalName")
    if kind != "ExternalName" and external_name is not None:
        problems.add(f.join(path, "externalName"), "only for type ExternalName")
    return {
        "affinity_timeout": timeout if affinity == "ClientIP" else None,
        "internal_traffic_policy": itp,
        "external_traffic_policy": etp,
        "prefer_close": section.get("trafficDistribution", f.one_of(("PreferClose",)), None)
        is not None,
        "publish_not_ready": section.get("publishNotReadyAddresses", f.boolean, False),
        "source_ranges": ranges,
        "health_check_node_port": health_port,
        "external_name": external_name,
        "labels": labels(section),
    }


def _affinity_timeout(section: f.Section) -> int:
    config = f.Section(
        section.raw("sessionAffinityConfig"),
        f.join(section.path, "sessionAffinityConfig"),
        section.problems,
        ("clientIP",),
    )
    client_ip = f.Section(
        config.raw("clientIP"),
        f.join(config.path, "clientIP"),
        section.problems,
        ("timeoutSeconds",),
    )
    return client_ip.get("timeoutSeconds", _affinity_seconds, DEFAULT_AFFINITY_TIMEOUT)


def labels(section: f.Section) -> tuple[tuple[str, str], ...]:
    raw = f.Section(section.raw("labels"), f.join(section.path, "labels"), section.problems, None)
    found: list[tuple[str, str]] = []
    for key, value in raw.values.items():
        if not isinstance(key, str):
            continue  # reported by Section
        if not isinstance(value, str):
            section.problems.add(
                f.join(raw.path, key), f"expected a string, got {f.type_name(value)}"
            )
            continue
        found.append((key, value))
    return tuple(sorted(found))


def skip_reason(raw: object, proxy_name: str) -> str | None:
    """Why kube-proxy would not proxy this service (pkg/proxy/servicechangetracker.go), or None.

    Read from the raw mapping, before validation: a headless service has no address to check."""
    if not isinstance(raw, dict):
        return None
    if raw.get("clusterIP") == "None":
        return "headless (clusterIP: None)"
    found = raw.get("labels")
    if not isinstance(found, dict):
        return None
    if LABEL_HEADLESS in found:
        return f"labelled {LABEL_HEADLESS}"
    if LABEL_PROXY_NAME in found and found[LABEL_PROXY_NAME] != proxy_name:
        value = f.show(found[LABEL_PROXY_NAME])
        return f"labelled {LABEL_PROXY_NAME}={value} (this proxy: {proxy_name!r})"
    return None


def conditions(section: f.Section) -> Conditions:
    ready = section.get("ready", f.boolean, True)
    return Conditions(
        ready=ready,
        serving=section.get("serving", f.boolean, ready),
        terminating=section.get("terminating", f.boolean, False),
        node_name=section.get("nodeName", f.string, None),
        zone=section.get("zone", f.string, None),
    )


def dns_section(section: f.Section) -> Dns:
    base = Dns()
    servers = tuple(
        server
        for path, raw in section.items("servers")
        if (server := _item(section, path, raw, dns_server))
    )
    min_ttl = section.get("minTtl", parse_duration, base.min_ttl)
    max_ttl = section.get("maxTtl", parse_duration, base.max_ttl)
    if min_ttl <= 0:
        section.problems.add(f.join(section.path, "minTtl"), "must be greater than 0")
    if max_ttl < min_ttl:
        section.problems.add(f.join(section.path, "maxTtl"), "must not be less than minTtl")
    return Dns(
        servers=servers,
        min_ttl=min_ttl,
        max_ttl=max_ttl,
        timeout=section.get("timeout", parse_duration, base.timeout),
    )


def dns_server(value: object) -> tuple[str, int]:
    """``IP`` (port 53), ``IP:PORT`` or ``[IPv6]:PORT``."""
    text = f.string(value).strip()
    host, sep, port_text = text.rpartition(":")
    if text.startswith("[") and "]:" in text:
        host, port_text = text[1:].split("]:", 1)
    elif not sep or ":" in host:
        host, port_text = text, "53"
    if not port_text.isdigit():
        raise FieldError(f"expected IP or IP:PORT, got {f.show(text)}")
    return f.ip_address(host), f.int_between(1, 65535)(int(port_text))


def dns_name(value: object) -> str:
    text = f.string(value).lower()
    if len(text) > 253 or not _DNS_NAME.fullmatch(text):
        raise FieldError(f"must be a DNS name such as db.example.com, got {f.show(text)}")
    return text.rstrip(".")


def cidr(value: object) -> str:
    text = f.string(value).strip()
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise FieldError(f"expected a CIDR such as 127.0.0.0/8, got {f.show(text)}") from None


def _item(section: f.Section, path: str, raw: object, parse: f.Parser[Any]) -> Any:
    try:
        return parse(raw)
    except FieldError as error:
        section.problems.add(path, str(error))
        return None
