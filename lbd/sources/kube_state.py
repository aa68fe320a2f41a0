"""What the API server said, kept per service, and the ``lbd/v1`` document it amounts to.

The watcher (``lbd.sources.kubernetes``) feeds full lists and watch events in; ``document()``
gives the bytes a reload validates and applies, the same path a file takes. Work is
proportional to what changed: a service is converted again only when its Service object
changed (``lbd.config.kube.convert_service``), and its endpoints merged again only when one of
its EndpointSlices did.

Each changed service is also validated alone before it goes into the document. One that does
not validate (a bad field, an invalid ``lbd.io/`` annotation) is rejected, logged and counted,
and keeps its last good form while the others apply; kube-proxy likewise skips what it cannot
program rather than stopping. A conflict between services (two claiming one listener) shows
only in the whole document: ``reject_conflicts`` takes the reload's problems, puts the named
services back to the form last applied, and the source tries again.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import structlog

from lbd.config import fields as f
from lbd.config.errors import ConfigError, Problem
from lbd.config.kube import ConvertedService, convert_service, node_fields, slice_owner
from lbd.config.kube import with_endpoints as merge_slices
from lbd.config.kubesource import SOURCE_KEYS
from lbd.config.loader import LoadOptions, build_config
from lbd.config.model import Config
from lbd.config.semantics import skip_reason
from lbd.config.yamlfile import parse_yaml
from lbd.observability.stats import KubernetesStats

log = structlog.get_logger("lbd.sources.kubernetes")

Obj = dict[str, Any]
SERVICE, SLICE, NODE = "Service", "EndpointSlice", "Node"
KINDS = (SERVICE, SLICE, NODE)
_SERVICE_INDEX = re.compile(r"services\[(\d+)\]")
# A listener that cannot be bound names its service: "cannot bind TCP ... (externalIP of ns/n)"
_LISTENER_OF = re.compile(
    r"\((?:clusterIP|externalIP|nodePort|loadBalancerIP) of ([^ )]+/[^ )]+)\)"
)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def object_key(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name')}"


def resource_version(obj: Obj) -> str | None:
    meta = obj.get("metadata")
    return meta.get("resourceVersion") if isinstance(meta, dict) else None


@dataclass(slots=True)
class _Entry:
    """One service: its object, its conversion, and the forms validated and applied."""

    obj: Obj | None = None  # the Service as served (None: not seen, or deleted)
    converted: ConvertedService | None = None  # None: convert again
    good: Obj | None = None  # the last form that validated alone: what goes into the document
    applied: Obj | None = None  # the form in the last document that was applied
    dirty: bool = True
    not_proxied: str | None = None  # why lbd leaves it alone (logged when this changes)


class ClusterState:
    def __init__(
        self,
        base: Obj,
        options: LoadOptions,
        allowed_ips: tuple[str, ...],
        stats: KubernetesStats,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base = base  # the file's document without services: node, defaults, admin, ...
        self.options = options
        self.allowed: tuple[Network, ...] = tuple(ipaddress.ip_network(c) for c in allowed_ips)
        self.stats = stats
        self.clock = clock
        self.listed: set[str] = set()  # kinds whose first full list has arrived
        self.services: dict[str, _Entry] = {}
        self.slice_owner: dict[str, str] = {}  # slice key -> owning service key
        self.slices: dict[str, dict[str, Obj]] = {}  # service key -> slice key -> slice
        self.node: Obj | None = None
        self._node_fields: Obj = {}
        self.changed_at: dict[str, float] = {}  # service -> first slice change not applied

    @property
    def proxy_name(self) -> str:
        """--proxy-name, else the file's node.proxyName (services labelled for another proxy
        are left alone)."""
        if self.options.proxy_name is not None:
            return self.options.proxy_name
        node = self.base.get("node")
        name = node.get("proxyName") if isinstance(node, dict) else None
        return name if isinstance(name, str) else ""

    @property
    def complete(self) -> bool:
        """Every kind has been listed once: the document is the cluster's, not a part of it."""
        return self.listed.issuperset(KINDS)

    # -- objects in ----------------------------------------------------------------------------

    def replace(self, kind: str, items: list[Obj]) -> bool:
        """A full list of ``kind`` (the first, or after 410 Gone); True if anything changed."""
        self.listed.add(kind)
        if kind == NODE:
            return self._set_node(items[0] if items else None)
        new = {object_key(obj): obj for obj in items}
        if kind == SERVICE:
            known = [key for key, entry in self.services.items() if entry.obj is not None]
        else:
            known = list(self.slice_owner)
        changed = False
        for key in [key for key in known if key not in new]:
            changed |= self.event(kind, "DELETED", None, key)
        for key, obj in new.items():
            changed |= self.event(kind, "MODIFIED", obj, key)
        return changed

    def event(self, kind: str, kind_type: str, obj: Obj | None, key: str | None = None) -> bool:
        """One ADDED / MODIFIED / DELETED of ``kind``; True if the document may change."""
        key = key or object_key(obj or {})
        gone = kind_type == "DELETED" or obj is None
        if kind == NODE:
            return self._set_node(None if gone else obj)
        if kind == SERVICE:
            return self._service(key, None if gone else obj)
        return self._slice(key, None if gone else obj)

    def _service(self, key: str, obj: Obj | None) -> bool:
        entry = self.services.get(key)
        if entry is None:
            if obj is None:
                return False
            entry = self.services[key] = _Entry()
        elif obj is not None and entry.obj is not None and _same(obj, entry.obj):
            return False  # a re-list repeats what the watch already said
        entry.obj, entry.converted, entry.dirty = obj, None, True
        return True

    def _slice(self, key: str, obj: Obj | None) -> bool:
        old_owner = self.slice_owner.get(key)
        if obj is not None and old_owner is not None:
            old = self.slices[old_owner][key]
            if _same(obj, old):
                return False
        owners: set[str] = set()
        if old_owner is not None:
            del self.slice_owner[key]
            del self.slices[old_owner][key]
            owners.add(old_owner)
        if obj is not None:
            owner = slice_owner(obj)
            self.slice_owner[key] = owner
            self.slices.setdefault(owner, {})[key] = obj
            owners.add(owner)  # a slice that moved changes both services
        now = self.clock()
        for owner in owners:
            self.services.setdefault(owner, _Entry()).dirty = True
            self.changed_at.setdefault(owner, now)
        return True

    def _set_node(self, obj: Obj | None) -> bool:
        self.node = obj
        # InternalIP only: a cloud's ExternalIP is usually not an address of the host (NAT),
        # and a NodePort listener cannot bind it.
        found = node_fields(obj, ("InternalIP",)) if obj is not None else {}
        changed, self._node_fields = found != self._node_fields, found
        return changed

    # -- document out --------------------------------------------------------------------------

    def node_document(self) -> Obj:
        """The file's ``node`` over what this node's Node object says (addresses, zone)."""
        node = self.base.get("node")
        return {**self._node_fields, **(node if isinstance(node, dict) else {})}

    def set_base(self, base: Obj) -> None:
        """A new file: defaults may change what validates, so every service is checked again."""
        self.base = base
        for entry in self.services.values():
            entry.dirty = True

    def document(self) -> tuple[bytes, list[str]]:
        """The ``lbd/v1`` document (JSON) and the service key at each ``services[i]``."""
        node = self.node_document()
        for key, entry in list(self.services.items()):
            if entry.dirty:
                self._rebuild(key, entry, node)
        keys = sorted(key for key, entry in self.services.items() if entry.good is not None)
        document = {
            **self.base,
            "apiVersion": "lbd/v1",
            "node": node,
            "services": [self.services[key].good for key in keys],
        }
        return json.dumps(document, separators=(",", ":")).encode(), keys

    def _rebuild(self, key: str, entry: _Entry, node: Obj) -> None:
        entry.dirty = False
        if entry.obj is None:
            entry.good = None
            if not self.slices.get(key):
                del self.services[key]
            return
        problems = f.Problems()
        try:
            document = self._convert(key, entry, problems)
        except Exception as error:  # hostile input must not stop the source: reject it
            self._reject(key, entry, [f"cannot convert: {type(error).__name__}: {error}"[:300]])
            return
        reason = _not_proxied(document, self.proxy_name)
        if reason != entry.not_proxied:
            entry.not_proxied = reason
            if reason is not None:
                log.info("service not proxied", service=key, reason=reason)
        if reason is not None:
            entry.good = None
            return
        if not problems.count:
            self._validate_alone(document, node, problems)
        if problems.count:
            self._reject(key, entry, [_relabel(str(p), entry.converted) for p in problems.all()])
        else:
            entry.good = document

    def _convert(self, key: str, entry: _Entry, problems: f.Problems) -> Obj:
        assert entry.obj is not None
        if entry.converted is None:
            entry.converted = self._allowed_only(convert_service(key, entry.obj, problems))
        warnings: list[str] = []
        slices = sorted(self.slices.get(key, {}).items())
        document = merge_slices(entry.converted, slices, problems, warnings)
        for warning in warnings:
            log.warning("endpointslice skipped", service=key, reason=warning)
        return document

    def _validate_alone(self, document: Obj, node: Obj, problems: f.Problems) -> None:
        alone = {"apiVersion": "lbd/v1", "node": node, "services": [document]}
        if "defaults" in self.base:
            alone["defaults"] = self.base["defaults"]
        build_config(alone, problems, self.options)

    def _reject(self, key: str, entry: _Entry, problems: list[str]) -> None:
        self.stats.kubernetes_services_rejected_total += 1
        self.changed_at.pop(key, None)
        log.error(
            "kubernetes service update rejected",
            service=key,
            keeping="its last good form" if entry.good is not None else "nothing: not served",
            problems=problems[:20],
        )

    def _allowed_only(self, converted: ConvertedService) -> ConvertedService:
        """externalIPs and LoadBalancer IPs outside ``--allowed-service-ips``, skipped."""
        document = dict(converted.document)
        for field in ("externalIPs", "loadBalancerIPs"):
            addresses = document.get(field)
            if not isinstance(addresses, list):
                continue
            kept = [a for a in addresses if self._allowed(a)]
            for address in addresses:
                if address not in kept:
                    self.stats.kubernetes_service_ips_skipped_total += 1
                    log.warning(
                        "service IP not allowed, skipped",
                        service=converted.key,
                        field=field,
                        address=str(address)[:64],
                        allowed=[str(n) for n in self.allowed],
                    )
            document[field] = kept
            if not kept and field == "loadBalancerIPs":
                del document[field]
        return replace(converted, document=document)

    def _allowed(self, address: object) -> bool:
        try:
            parsed = ipaddress.ip_address(str(address))
        except ValueError:
            return False
        return any(parsed in network for network in self.allowed)

    # -- after a reload ------------------------------------------------------------------------

    def applied(self) -> list[float]:
        """The document was applied: remember each service's form; returns the seconds from
        each pending EndpointSlice change to now (network programming latency)."""
        for entry in self.services.values():
            entry.applied = entry.good
        now = self.clock()
        latencies = [now - seen for seen in self.changed_at.values()]
        self.changed_at.clear()
        return latencies

    def reject_conflicts(self, problems: tuple[str, ...], keys: list[str]) -> bool:
        """The whole document failed: put each service a problem names (by its path, or as a
        listener that cannot be bound) back to the form last applied; one that fails in that
        form too is left out. False when no problem names a service."""
        named: dict[str, list[str]] = {}
        for problem in problems:
            match = _SERVICE_INDEX.match(problem)
            key = None
            if match and int(match.group(1)) < len(keys):
                key = keys[int(match.group(1))]
            elif listener := _LISTENER_OF.search(problem):
                key = listener.group(1)
            if key is not None and key in self.services:
                named.setdefault(key, []).append(problem)
        for key, found in named.items():
            entry = self.services[key]
            entry.good = entry.applied if entry.good is not entry.applied else None
            self._reject(key, entry, found)
        return bool(named)


def read_base(data: bytes, label: str, options: LoadOptions) -> tuple[Config, Obj]:
    """The file of an lbd whose services come from the API server: its config (no services)
    and the top-level keys every document is built on. A ConfigError when it is not valid."""
    document = parse_yaml(data, label)
    if not isinstance(document, dict):
        raise ConfigError(
            [Problem("", f"the document must be a mapping, got {f.type_name(document)}")], label
        )
    document = {**document, "source": "kubernetes"}
    problems = f.Problems()
    config = build_config(document, problems, options)
    if problems.count or config is None:
        raise ConfigError(problems.all(), label)
    return config, {k: v for k, v in document.items() if k not in ("services", *SOURCE_KEYS)}


def _same(a: Obj, b: Obj) -> bool:
    version = resource_version(a)
    return version is not None and version == resource_version(b)


def _not_proxied(document: Obj, proxy_name: str) -> str | None:
    """Services kube-proxy leaves alone: headless, other proxies', and ExternalName (a DNS
    name, which cluster DNS answers; the API gives it no clusterIP to serve on)."""
    if document.get("type") == "ExternalName":
        return "type ExternalName (served by cluster DNS)"
    return skip_reason(document, proxy_name)


def _relabel(problem: str, converted: ConvertedService | None) -> str:
    """``services[0].connectTimeout: ...`` → ``annotation lbd.io/connectTimeout: ...``."""
    text = problem.removeprefix("services[0].")
    head = re.split(r"[.\[:]", text, maxsplit=1)[0]
    if converted is not None and head in converted.annotations:
        return f"annotation {converted.annotations[head]}{text[len(head) :]}"
    return text
