"""The typed, frozen configuration every other module sees.

The loader (``lbd.config.loader``) is the only code that reads raw YAML; everything after it
works on these objects. Per-service values are already merged with ``defaults``, and NodePorts
that the file left out are already allocated, so consumers never resolve anything twice.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from lbd.config.faultspec import Fault, Mirror

API_VERSION = "lbd/v1"

Protocol = Literal["TCP", "UDP"]
ServiceType = Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]
TrafficPolicy = Literal["Cluster", "Local"]
StrategyName = Literal["random", "round-robin", "least-connection", "maglev", "source-hash"]
ListenerKind = Literal["clusterIP", "externalIP", "nodePort", "loadBalancerIP"]
HealthCheckType = Literal["tcp", "http"]
ProxyProtocolVersion = Literal["v1", "v2"]
SpliceMode = Literal["auto", "off"]
HashOn = Literal["clientIP", "clientIPPort"]
SourceKind = Literal["file", "kubernetes"]

SERVICE_TYPES: tuple[ServiceType, ...] = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
TRAFFIC_POLICIES: tuple[TrafficPolicy, ...] = ("Cluster", "Local")
DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds, as Kubernetes' sessionAffinityConfig default
# Labels kube-proxy reads (pkg/proxy/apis/well_known_labels.go): a service carrying either is
# not proxied by this proxy.
LABEL_PROXY_NAME = "service.kubernetes.io/service-proxy-name"
LABEL_HEADLESS = "service.kubernetes.io/headless"
STRATEGIES: tuple[StrategyName, ...] = (
    "random",
    "round-robin",
    "least-connection",
    "maglev",
    "source-hash",
)
PROTOCOLS: tuple[Protocol, ...] = ("TCP", "UDP")
DEFAULT_MAX_UDP_SESSIONS = 65536
HEALTH_CHECK_TYPES: tuple[HealthCheckType, ...] = ("tcp", "http")
PROXY_PROTOCOL_VERSIONS: tuple[ProxyProtocolVersion, ...] = ("v1", "v2")
SPLICE_MODES: tuple[SpliceMode, ...] = ("auto", "off")
HASH_ON: tuple[HashOn, ...] = ("clientIP", "clientIPPort")
DEFAULT_MAGLEV_TABLE_SIZE = 65537
MAX_WORKERS = 256
DEFAULT_SYNC_PERIOD = 30.0  # seconds, as kube-proxy's --sync-period


@dataclass(frozen=True, slots=True)
class Conditions:
    """An endpoint's conditions, as an EndpointSlice carries them (discovery.k8s.io/v1)."""

    ready: bool = True
    serving: bool = True  # defaults to ``ready`` in the loader
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None


READY = Conditions()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend address of a service, as written in the config."""

    address: str  # normalised IP literal
    ports: tuple[tuple[str, int], ...] = ()  # named ports, sorted by name
    weight: int = 1
    conditions: Conditions = READY

    def port_named(self, name: str) -> int | None:
        for port_name, number in self.ports:
            if port_name == name:
                return number
        return None

    def target_port(self, target: int | str) -> int | None:
        """The port number this endpoint serves for ``target`` (a number or a port name)."""
        return target if isinstance(target, int) else self.port_named(target)


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str | None
    protocol: Protocol
    port: int
    target_port: int | str
    node_port: int | None  # set (allocated if omitted) for NodePort and LoadBalancer services


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """An active probe of every endpoint (HAProxy's ``check``; rise/fall as thresholds).

    Hashable on purpose: (address, port, HealthCheck) is the key of one shared checker.
    """

    type: HealthCheckType = "tcp"
    interval: float = 5.0
    timeout: float = 2.0
    jitter: float = 0.0  # each wait is interval ± up to jitter, so checks do not align
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    path: str = "/"  # http
    host: str | None = None  # http Host header; the endpoint address when None
    expect_status: tuple[int, int] = (200, 399)  # http, inclusive
    send: bytes = b""  # tcp: written after connecting
    expect: bytes = b""  # tcp: must appear in the first bytes read


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """Passive ejection on connect failures, as Envoy's outlier detection."""

    consecutive_failures: int = 5
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 10


@dataclass(frozen=True, slots=True)
class Tunables:
    """Every per-service setting that ``defaults`` may set too: one field per lbd/v1 key.

    ``lbd.config.tunables.TUNABLES`` is the one table that maps each key to its field, parser
    and rendering; the loader, ``render`` (``GET /config``, the config hash) and the reload
    diff all go through it, so a setting cannot be read but left out of what lbd reports.
    A service's value is already merged with ``defaults``; routes carry the same object.
    """

    strategy: StrategyName = "round-robin"
    connect_timeout: float = 1.0
    idle_timeout: float = 3600.0
    drain_timeout: float = 30.0
    udp_idle_timeout: float = 30.0  # a UDP session with no datagram either way for this long ends
    max_udp_sessions: int = DEFAULT_MAX_UDP_SESSIONS  # per UDP port; new clients past it dropped
    # UDP amplification: the replies each client datagram allows (nginx's proxy_responses; the
    # session ends once they all came), and new sessions per second from one client address.
    udp_responses: int | None = None
    udp_session_rate: int | None = None
    half_closed_timeout: float = 60.0  # after one side finished (sent its FIN)
    max_connection_duration: float | None = None  # any connection, however busy
    access_log: bool = False
    splice: SpliceMode = "auto"  # auto: bulk TCP directions move to splice(2); off: never
    health_check: HealthCheck | None = None
    outlier_detection: OutlierDetection | None = None
    slow_start: float = 0.0
    # HAProxy's maxconn + queue, per service port and per endpoint; None is unlimited.
    max_connections: int | None = None
    max_connections_per_endpoint: int | None = None
    max_queue: int = 0
    queue_timeout: float = 5.0
    proxy_protocol: ProxyProtocolVersion | None = None  # header written to every endpoint
    accept_proxy_protocol_from: tuple[str, ...] = ()  # CIDRs whose header is read and trusted
    # Hash-based strategies (maglev, source-hash): what identifies a client, and Maglev's
    # lookup table size (a prime).
    hash_on: HashOn = "clientIP"
    maglev_table_size: int = DEFAULT_MAGLEV_TABLE_SIZE
    # Load-test faults and connection mirroring (docs/faults.md; lbd.config.faults).
    faults: tuple[Fault, ...] = ()
    mirror: Mirror | None = None

    @property
    def limited(self) -> bool:
        """Whether connections of the port go through admission (limits and queue)."""
        return self.max_connections is not None or self.max_connections_per_endpoint is not None


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    type: ServiceType
    cluster_ip: str
    external_ips: tuple[str, ...]
    load_balancer_ips: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    endpoints: tuple[Endpoint, ...]
    tunables: Tunables = field(default_factory=Tunables)
    # Kubernetes Service semantics (docs/kubernetes.md); defaults are Kubernetes' own.
    affinity_timeout: int | None = None  # sessionAffinity ClientIP: seconds; None: no affinity
    internal_traffic_policy: TrafficPolicy = "Cluster"
    external_traffic_policy: TrafficPolicy = "Cluster"
    prefer_close: bool = False  # trafficDistribution: PreferClose
    publish_not_ready: bool = False  # publishNotReadyAddresses
    source_ranges: tuple[str, ...] = ()  # loadBalancerSourceRanges, normalised CIDRs
    health_check_node_port: int | None = None  # LoadBalancer + externalTrafficPolicy Local
    external_name: str | None = None  # type ExternalName: the host name to resolve
    labels: tuple[tuple[str, str], ...] = ()
    # clusterIPs: every cluster IP, ``cluster_ip`` first; a dual-stack service has one of each
    # family and is served on both. Empty: ``cluster_ip`` alone.
    cluster_ips: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    zone: str | None
    addresses: tuple[str, ...]
    node_port_range: tuple[int, int]
    proxy_name: str = ""  # --proxy-name: serve services whose service-proxy-name label is this
    # Put the service addresses lbd serves on the node itself (lbd.net.addresses), and check
    # them every sync_period seconds (kube-proxy's --sync-period) besides netlink events.
    manage_addresses: bool = False
    sync_period: float = DEFAULT_SYNC_PERIOD


@dataclass(frozen=True, slots=True)
class Admin:
    """Where the admin HTTP API listens: a TCP address (loopback by default) or a unix socket."""

    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = 9180  # 0: the kernel picks (tests)
    socket: str | None = None  # a unix socket path; replaces address/port when set
    token_file: str | None = None  # bearer token for mutating calls over TCP

    def describe(self) -> str:
        if self.socket is not None:
            return f"unix:{self.socket}"
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Dns:
    """How ExternalName services are resolved: ``servers`` empty means the system resolver."""

    servers: tuple[tuple[str, int], ...] = ()
    min_ttl: float = 5.0  # re-resolve no more often than this, whatever the record says
    max_ttl: float = 300.0  # and at least this often
    timeout: float = 2.0  # per query


@dataclass(frozen=True, slots=True)
class Skipped:
    """A service in the file that lbd does not proxy, and why (kube-proxy skips it too)."""

    service: str  # namespace/name
    reason: str


@dataclass(frozen=True, slots=True)
class KubernetesSettings:
    """``source: kubernetes`` (``lbd.config.kubesource``, ``lbd.sources.kubernetes``)."""

    kubeconfig: str | None = None  # else $KUBECONFIG, else in-cluster, else ~/.kube/config
    # At most one apply per this long; an apply never waits longer after the last event.
    min_sync_period: float = 1.0  # kube-proxy's --iptables-min-sync-period default
    # CIDRs that externalIPs and LoadBalancer IPs from the API may be in (CVE-2020-8554):
    # anyone allowed to create a Service could otherwise make lbd intercept any address.
    allowed_service_ips: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    node: Node
    defaults: Tunables
    services: tuple[Service, ...]
    admin: Admin = field(default_factory=Admin)
    dns: Dns = field(default_factory=Dns)
    skipped: tuple[Skipped, ...] = ()
    # Processes serving every listener (``auto``: one per CPU). Like ``admin``, read at start:
    # a reload that changes it is applied and logged, the count changes on the next restart.
    workers: int = 1
    # What ``lbd check`` reports but does not refuse: a service port no endpoint serves, an
    # EndpointSlice of a family the service has no clusterIP for. Not part of the diff.
    warnings: tuple[str, ...] = ()
    # source: kubernetes: the services come from the API server (lbd.sources.kubernetes)
    source: SourceKind = "file"
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    """One socket lbd binds: where it listens and which service port it feeds."""

    protocol: Protocol
    address: str
    port: int
    kind: ListenerKind
    service: str  # namespace/name
    port_index: int  # index into Service.ports (for error paths; not stable across reloads)
    port_id: str  # the port's name, or its number when unnamed: stable across reloads

    @property
    def bind_key(self) -> tuple[str, str, int]:
        return (self.protocol, self.address, self.port)

    @property
    def route_key(self) -> tuple[str, str]:
        return (self.service, self.port_id)

    @property
    def identity(self) -> tuple[object, ...]:
        """What makes two specs the same socket across a reload. Port 0 sockets are told apart
        by their owner, since the kernel gives each its own port."""
        if self.port:
            return self.bind_key
        return (*self.bind_key, self.service, self.port_id, self.kind)

    def describe(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.protocol} {host}:{self.port}"

    @property
    def external(self) -> bool:
        """Traffic from outside the cluster: subject to externalTrafficPolicy, not internal."""
        return self.kind != "clusterIP"

    @property
    def filtered(self) -> bool:
        """loadBalancerSourceRanges apply (LoadBalancer IPs only, not NodePorts: Kubernetes)."""
        return self.kind == "loadBalancerIP"


def listeners_of(service: Service, node: Node) -> list[ListenerSpec]:
    """Every socket a service asks for, in a stable order (Kubernetes' Service semantics)."""
    specs: list[ListenerSpec] = []
    for index, port in enumerate(service.ports):
        places: list[tuple[str, int, ListenerKind]] = [
            (address, port.port, "clusterIP")
            for address in service.cluster_ips or (service.cluster_ip,)
        ]
        places += [(address, port.port, "externalIP") for address in service.external_ips]
        if service.type in ("NodePort", "LoadBalancer") and port.node_port is not None:
            places += [(address, port.node_port, "nodePort") for address in node.addresses]
        if service.type == "LoadBalancer":
            places += [(a, port.port, "loadBalancerIP") for a in service.load_balancer_ips]
        specs += [
            ListenerSpec(port.protocol, address, number, kind, service.key, index, port_id(port))
            for address, number, kind in places
        ]
    return specs


def port_id(port: ServicePort) -> str:
    """A service port's stable identity within its service: its name, or its number."""
    return port.name or str(port.port)


def is_wildcard(address: str) -> bool:
    return ipaddress.ip_address(address).is_unspecified
