"""The loader: one test per kind of bad input, each checking the exact ``path: message``."""

from __future__ import annotations

import os
import textwrap

import pytest

from lbd.config import ConfigError, load_file, load_text
from lbd.config.durations import parse_duration
from lbd.config.errors import FieldError
from lbd.config.model import listeners_of
from lbd.config.routes import route_specs
from lbd.config.yamlfile import MAX_CONFIG_BYTES

GOOD = """
apiVersion: lbd/v1
node:
  name: node-a
  zone: zone-a
  addresses: [127.0.0.5]
  nodePortRange: 30000-32767
defaults:
  strategy: random
  connectTimeout: 250ms
  idleTimeout: 1h30m
  drainTimeout: 5
  accessLog: true
services:
  - name: web
    namespace: shop
    type: LoadBalancer
    clusterIP: 127.96.0.10
    externalIPs: [127.98.0.1]
    loadBalancerIPs: [127.97.0.1]
    strategy: least-connection
    ports:
      - name: http
        port: 80
        targetPort: http
        nodePort: 30080
      - name: admin
        port: 81
    endpoints:
      - address: 127.0.1.1
        ports: {http: 8080}
        weight: 3
      - {address: 127.0.1.2, ports: {http: 8081}, weight: 0}
  - name: db
    clusterIP: "::1"
    ports: [{port: 5432}]
    endpoints: [127.0.2.1, "::1"]
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_text(textwrap.dedent(text), "<test>")
    return [str(p) for p in caught.value.problems]


def with_service(body: str, head: str = "apiVersion: lbd/v1\n") -> str:
    return head + "services:\n" + textwrap.indent(textwrap.dedent(body), "  ")


def test_good_config_is_typed_and_merged_with_defaults() -> None:
    config = load_text(GOOD)
    web, db = config.services
    assert config.node.name == "node-a" and config.node.addresses == ("127.0.0.5",)
    assert web.key == "shop/web" and web.type == "LoadBalancer"
    assert web.tunables.strategy == "least-connection"
    assert db.tunables.strategy == "random"  # from defaults
    tun = web.tunables
    assert tun.connect_timeout == 0.25 and tun.idle_timeout == 5400 and tun.drain_timeout == 5
    assert web.tunables.access_log is True
    assert web.ports[0].target_port == "http" and web.ports[0].node_port == 30080
    assert web.ports[1].target_port == 81  # default: the port itself
    assert 30000 <= (web.ports[1].node_port or 0) <= 32767  # allocated
    assert web.endpoints[0].target_port("http") == 8080 and web.endpoints[1].weight == 0
    assert db.cluster_ip == "::1" and db.namespace == "default"
    assert db.ports[0].node_port is None
    kinds = [spec.kind for spec in listeners_of(web, config.node)]
    assert kinds == ["clusterIP", "externalIP", "nodePort", "loadBalancerIP"] * 2


def test_defaults_when_optional_sections_are_missing() -> None:
    config = load_text(
        "apiVersion: lbd/v1\nservices: [{name: a, clusterIP: 127.0.0.9, ports: [{port: 1}]}]"
    )
    assert config.node.addresses == ("0.0.0.0",)
    assert config.node.node_port_range == (30000, 32767)
    assert (config.node.manage_addresses, config.node.sync_period) == (False, 30)
    service = config.services[0]
    assert service.tunables.strategy == "round-robin" and service.type == "ClusterIP"
    assert (
        service.tunables.connect_timeout,
        service.tunables.idle_timeout,
        service.tunables.drain_timeout,
    ) == (
        1,
        3600,
        30,
    )
    assert service.endpoints == ()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("1h30m", 5400),
        (2, 2),
        (1.5, 1.5),
        ("0.5s", 0.5),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "1d", "ms", "-1s", "1 h", True, [1], -3])
def test_bad_durations(text: object) -> None:
    with pytest.raises(FieldError):
        parse_duration(text)


def test_unknown_key_has_did_you_mean() -> None:
    text = with_service(
        "- name: a\n  clusterIP: 127.0.0.9\n  stratgy: random\n  ports: [{port: 1}]\n"
    )
    [problem] = problems_of(text)
    assert problem.startswith("services[0].stratgy: unknown key (did you mean 'strategy'?)")


def test_unknown_top_level_key_from_a_later_issue_is_an_error_not_ignored() -> None:
    assert problems_of("apiVersion: lbd/v1\nservices: []\nthreads: 4\n")[0].startswith(
        "threads: unknown key"
    )


def test_wrong_types() -> None:
    text = with_service(
        "- name: 7\n  clusterIP: [127.0.0.9]\n  ports: {port: 1}\n  accessLog: 'yes'\n"
    )
    assert problems_of(text) == [
        "services[0].ports: expected a list, got a mapping",
        "services[0].ports: at least one port is required",
        "services[0].name: expected a string, got a number",
        "services[0].clusterIP: expected a string, got a list",
        "services[0].accessLog: expected true or false, got 'yes'",
    ]


def test_port_out_of_range() -> None:
    text = with_service(
        "- name: a\n  clusterIP: 127.0.0.9\n  ports: [{port: 70000, targetPort: 0}]\n"
    )
    assert problems_of(text) == [
        "services[0].ports[0].port: must be between 0 and 65535, got 70000",
        "services[0].ports[0].targetPort: must be between 1 and 65535, got 0",
    ]


def test_invalid_ip_addresses() -> None:
    text = with_service(
        "- name: a\n  clusterIP: 127.0.0.999\n  externalIPs: [0.0.0.0]\n  ports: [{port: 1}]\n"
        "  endpoints: [not-an-ip]\n"
    )
    assert problems_of(text) == [
        "services[0].endpoints[0]: expected an IP address, got 'not-an-ip'",
        "services[0].clusterIP: expected an IP address, got '127.0.0.999'",
        "services[0].externalIPs[0]: must be a unicast address, got 0.0.0.0",
    ]


def test_duplicate_service_names_per_namespace() -> None:
    text = with_service(
        "- {name: a, clusterIP: 127.0.0.9, ports: [{port: 1}]}\n"
        "- {name: a, namespace: other, clusterIP: 127.0.0.9, ports: [{port: 2}]}\n"
        "- {name: a, clusterIP: 127.0.0.9, ports: [{port: 3}]}\n"
    )
    assert problems_of(text) == [
        "services[2].name: duplicate service default/a (first at services[0])"
    ]


def test_duplicate_listener_across_services() -> None:
    text = with_service(
        "- {name: a, clusterIP: 127.0.0.9, ports: [{port: 80}]}\n"
        "- {name: b, clusterIP: 127.0.0.8, externalIPs: [127.0.0.9], ports: [{port: 80}]}\n"
    )
    assert problems_of(text) == [
        "services[1].ports[0]: externalIP listener TCP 127.0.0.9:80 conflicts with the clusterIP "
        "listener TCP 127.0.0.9:80 of default/a (services[0].ports[0])"
    ]


def test_wildcard_node_address_conflicts_with_a_specific_listener_on_the_same_port() -> None:
    text = with_service(
        "- {name: a, clusterIP: 127.0.0.9, ports: [{port: 30080}]}\n"
        "- {name: b, type: NodePort, clusterIP: 127.0.0.8, ports: [{port: 80, nodePort: 30080}]}\n",
        head="apiVersion: lbd/v1\nnode: {addresses: [0.0.0.0]}\n",
    )
    assert problems_of(text) == [
        "services[1].ports[0]: nodePort listener TCP 0.0.0.0:30080 conflicts with the clusterIP "
        "listener TCP 127.0.0.9:30080 of default/a (services[0].ports[0])"
    ]


def test_node_port_outside_range_and_taken_twice() -> None:
    text = with_service(
        "- {name: a, type: NodePort, clusterIP: 127.0.0.9, ports: [{port: 1, nodePort: 29999}]}\n"
        "- {name: b, type: NodePort, clusterIP: 127.0.0.8, ports: [{port: 1, nodePort: 30001}]}\n"
        "- {name: c, type: NodePort, clusterIP: 127.0.0.7, ports: [{port: 1, nodePort: 30001}]}\n",
        head="apiVersion: lbd/v1\nnode: {addresses: [127.0.0.5]}\n",
    )
    assert problems_of(text) == [
        "services[0].ports[0].nodePort: 29999 is outside nodePortRange 30000-32767",
        "services[2].ports[0].nodePort: TCP nodePort 30001 already used by services[1].ports[0].nodePort",
    ]


def test_node_port_on_cluster_ip_service_and_lb_ips_on_node_port_service() -> None:
    text = with_service(
        "- {name: a, clusterIP: 127.0.0.9, ports: [{port: 1, nodePort: 30001}]}\n"
        "- {name: b, type: NodePort, clusterIP: 127.0.0.8, loadBalancerIPs: [127.0.0.1], ports: [{port: 1}]}\n"
    )
    assert problems_of(text) == [
        "services[0].ports[0].nodePort: only NodePort and LoadBalancer services have a nodePort",
        "services[1].loadBalancerIPs: only for type LoadBalancer",
    ]


def test_a_service_port_uses_only_the_endpoints_that_carry_its_target_port() -> None:
    # Kubernetes: a pod without the named port is not an endpoint of that service port
    # (issue 12: this was an error that rejected the whole config).
    text = with_service(
        "- name: a\n  clusterIP: 127.0.0.9\n"
        "  ports: [{name: web, port: 80, targetPort: http}, {name: m, port: 81, targetPort: metrics}]\n"
        "  endpoints:\n  - {address: 127.0.1.1, ports: {http: 8080}}\n"
        "  - {address: 127.0.1.2, ports: {metrics: 9090}}\n"
    )
    config = load_text(text)
    targets = {key[1]: [t[:2] for t in spec.targets] for key, spec in route_specs(config).items()}
    assert targets == {"web": [("127.0.1.1", 8080)], "m": [("127.0.1.2", 9090)]}
    assert config.warnings == ()


def test_a_port_no_endpoint_serves_is_a_warning_not_an_error() -> None:
    text = with_service(
        "- name: a\n  clusterIP: 127.0.0.9\n  ports: [{port: 80, targetPort: htp}]\n"
        "  endpoints:\n  - {address: 127.0.1.2, ports: {http: 8080}}\n"
    )
    config = load_text(text)
    assert route_specs(config)[("default/a", "80")].targets == ()
    assert config.warnings == (
        'default/a port 80: no endpoint has a port named "htp"; connections to it are refused',
    )


def test_port_names_required_and_unique_with_several_ports() -> None:
    text = with_service(
        "- name: a\n  clusterIP: 127.0.0.9\n  ports: [{port: 80}, {name: x, port: 81}, {name: x, port: 80}]\n"
    )
    assert problems_of(text) == [
        "services[0].ports[0].name: required when a service has more than one port",
        "services[0].ports[2].name: duplicate port name (first at services[0].ports[1])",
    ]


def test_bad_enums_have_did_you_mean() -> None:
    text = with_service(
        "- {name: a, type: Nodeport, clusterIP: 127.0.0.9, strategy: roundrobin, ports: [{port: 1, protocol: SCTP}]}\n"
    )
    assert problems_of(text) == [
        "services[0].type: must be one of ClusterIP, NodePort, LoadBalancer, ExternalName, got 'Nodeport' "
        "(did you mean 'NodePort'?)",
        "services[0].ports[0].protocol: must be one of TCP, UDP, got 'SCTP'",
        "services[0].strategy: must be one of random, round-robin, least-connection, maglev, "
        "source-hash, got 'roundrobin' (did you mean 'round-robin'?)",
    ]


def test_names_must_be_dns_labels_and_weights_non_negative() -> None:
    text = with_service(
        "- name: Web_1\n  clusterIP: 127.0.0.9\n  ports: [{port: 1}]\n"
        "  endpoints: [{address: 127.0.0.1, weight: -1}]\n"
    )
    assert problems_of(text) == [
        "services[0].endpoints[0].weight: must be between 0 and 1000000, got -1",
        "services[0].name: must be a DNS label (lower-case letters, digits and '-', at most 63), "
        "got 'Web_1'",
    ]


def test_an_address_listed_twice_has_the_union_of_its_ports() -> None:
    text = with_service(
        "- name: a\n  clusterIP: 127.0.0.9\n"
        "  ports: [{name: a, port: 1, targetPort: a}, {name: b, port: 2, targetPort: b}]\n"
        "  endpoints:\n  - {address: 127.0.1.1, ports: {a: 10}}\n  - 127.0.1.2\n"
        "  - {address: 127.0.1.1, ports: {b: 20}}\n  - 127.0.1.2\n"
    )
    [service] = load_text(text).services
    assert [(e.address, e.ports) for e in service.endpoints] == [
        ("127.0.1.1", (("a", 10), ("b", 20))),
        ("127.0.1.2", ()),
    ]


def test_an_address_listed_twice_must_agree_on_numbers_weight_and_conditions() -> None:
    text = with_service(
        "- name: a\n  clusterIP: 127.0.0.9\n  ports: [{port: 1, targetPort: a}]\n"
        "  endpoints:\n  - {address: 127.0.1.1, ports: {a: 10}}\n"
        "  - {address: 127.0.1.1, ports: {a: 11}}\n  - {address: 127.0.1.1, weight: 2}\n"
    )
    assert problems_of(text) == [
        "services[0].endpoints[1].ports.a: 127.0.1.1 has port a = 10 at services[0].endpoints[0], "
        "here 11",
        "services[0].endpoints[2]: 127.0.1.1 is listed at services[0].endpoints[0] with another "
        "weight or other conditions; an address listed twice only adds ports",
    ]


def test_dual_stack_cluster_ips_listen_on_both_families() -> None:
    text = with_service(
        "- {name: a, clusterIPs: [127.0.0.9, '::1'], ports: [{port: 80}], endpoints: [127.0.1.1]}\n"
    )
    config = load_text(text)
    [service] = config.services
    assert service.cluster_ip == "127.0.0.9"
    addresses = [spec.address for spec in listeners_of(service, config.node)]
    assert addresses == ["127.0.0.9", "::1"]


@pytest.mark.parametrize(
    ("ips", "problem"),
    [
        (
            "clusterIP: 127.0.0.9, clusterIPs: ['::1', 127.0.0.9]",
            "services[0].clusterIPs: the first address must be clusterIP (127.0.0.9)",
        ),
        (
            "clusterIPs: [127.0.0.9, 127.0.0.8]",
            "services[0].clusterIPs: at most two addresses, one IPv4 and one IPv6",
        ),
        ("clusterIPs: []", "services[0].clusterIP: required"),
    ],
)
def test_bad_cluster_ips(ips: str, problem: str) -> None:
    assert problems_of(with_service(f"- {{name: a, {ips}, ports: [{{port: 80}}]}}\n")) == [problem]


def test_missing_required_fields() -> None:
    assert problems_of("apiVersion: lbd/v1\nservices: [{}]\n") == [
        "services[0].ports: at least one port is required",
        "services[0].name: required",
        "services[0].clusterIP: required",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "<test>: the file is empty"),
        ("# only a comment\n", "<test>: the file is empty"),
        ("- a\n- b\n", "the document must be a mapping, got a list"),
        ("just text", "the document must be a mapping, got a string"),
        ("apiVersion: v1\nservices: []", "apiVersion: must be 'lbd/v1', got 'v1'"),
        ("services: []", "apiVersion: required"),
        (
            "apiVersion: lbd/v1\nservices: []\nservices: []\n",
            "<test>: invalid YAML at line 3, column 1: duplicate key 'services'",
        ),
        (
            "apiVersion: lbd/v1\nservices: [\n",
            "<test>: invalid YAML at line 3, column 1: ",
        ),
        (
            "apiVersion: lbd/v1\n---\napiVersion: lbd/v1\n",
            "<test>: expected one YAML document, found 2",
        ),
        (
            "apiVersion: !!python/object:os.system ls\n",
            "<test>: invalid YAML at line 1, column 13: could not determine a constructor for the tag 'tag:yaml.org,2002:python/object:os.system'",
        ),
    ],
)
def test_documents_that_are_not_configs(text: str, expected: str) -> None:
    # Parser messages differ between libyaml and pure-Python PyYAML: where the expected text
    # ends in ": ", only the position part is checked.
    [problem] = problems_of(text)
    assert problem.startswith(expected) if expected.endswith(": ") else problem == expected


def test_size_cap() -> None:
    assert problems_of("#" * (MAX_CONFIG_BYTES + 1)) == ["<test>: larger than 16 MiB"]


def test_every_problem_is_reported_at_once() -> None:
    text = with_service(
        "- {name: a, clusterIP: nope, ports: [{port: 1}]}\n- {name: b, clusterIP: 127.0.0.1, ports: [{port: -1}]}\n",
        head="apiVersion: lbd/v2\n",
    )
    assert len(problems_of(text)) == 3


def test_unreadable_file(tmp_path: pytest.TempPathFactory) -> None:
    missing = f"{tmp_path}/nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_file(missing)
    assert str(caught.value) == f"{missing}: cannot read: No such file or directory"


def test_node_port_allocation_is_deterministic_and_stable() -> None:
    base = "apiVersion: lbd/v1\nnode: {addresses: [127.0.0.5], nodePortRange: 30000-30009}\nservices:\n"
    one = "  - {name: a, type: NodePort, clusterIP: 127.0.0.9, ports: [{port: 1}]}\n"
    other = (
        "  - {name: b, type: NodePort, clusterIP: 127.0.0.8, ports: [{port: 1, nodePort: 30005}]}\n"
    )
    first = load_text(base + one).services[0].ports[0].node_port
    assert first is not None and 30000 <= first <= 30009
    assert load_text(base + one).services[0].ports[0].node_port == first
    # Another service placed before it (with an explicit port elsewhere) does not move it.
    if first != 30005:
        assert load_text(base + other + one).services[1].ports[0].node_port == first


def test_node_port_range_exhausted() -> None:
    text = (
        "apiVersion: lbd/v1\nnode: {addresses: [127.0.0.5], nodePortRange: 30000-30001}\nservices:\n"
        "  - {name: a, type: NodePort, clusterIP: 127.0.0.9, ports: [{name: x, port: 1}, {name: y, port: 2}, {name: z, port: 3}]}\n"
    )
    assert problems_of(text) == [
        "services[0].ports[2].nodePort: no free nodePort left in 30000-30001"
    ]


def test_udp_tunables_default_and_merge() -> None:
    config = load_text(
        "apiVersion: lbd/v1\n"
        "defaults: {udpIdleTimeout: 10s, maxUdpSessions: 100}\n"
        "services:\n"
        "  - {name: a, clusterIP: 127.0.0.9, ports: [{port: 53, protocol: UDP}]}\n"
        "  - {name: b, clusterIP: 127.0.0.8, udpIdleTimeout: 2m, maxUdpSessions: 7,\n"
        "     ports: [{port: 53, protocol: UDP}]}\n"
    )
    a, b = config.services
    assert a.ports[0].protocol == "UDP"
    assert (a.tunables.udp_idle_timeout, a.tunables.max_udp_sessions) == (10, 100)
    assert (b.tunables.udp_idle_timeout, b.tunables.max_udp_sessions) == (120, 7)
    bare = load_text(
        "apiVersion: lbd/v1\nservices: [{name: a, clusterIP: 127.0.0.9, ports: [{port: 1}]}]"
    )
    bare_tunables = bare.services[0].tunables
    assert (bare_tunables.udp_idle_timeout, bare_tunables.max_udp_sessions) == (30, 65536)


def test_bad_udp_idle_timeout() -> None:
    text = with_service(
        "- {name: a, clusterIP: 127.0.0.9, udpIdleTimeout: 0s, ports: [{port: 1, protocol: UDP}]}\n",
        head="apiVersion: lbd/v1\ndefaults: {udpIdleTimeout: soon}\n",
    )
    assert problems_of(text) == [
        "defaults.udpIdleTimeout: expected a duration such as 250ms, 30s, 5m or 1h30m, got 'soon'",
        "services[0].udpIdleTimeout: must be greater than 0",
    ]


def test_bad_max_udp_sessions() -> None:
    text = with_service(
        "- {name: a, clusterIP: 127.0.0.9, maxUdpSessions: 0, ports: [{port: 1, protocol: UDP}]}\n"
        "- {name: b, clusterIP: 127.0.0.8, maxUdpSessions: many, ports: [{port: 1, protocol: UDP}]}\n"
    )
    assert problems_of(text) == [
        "services[0].maxUdpSessions: must be between 1 and 1000000, got 0",
        "services[1].maxUdpSessions: expected a whole number, got a string 'many'",
    ]


def test_same_port_on_tcp_and_udp_is_fine_but_not_twice_on_one_protocol() -> None:
    ok = load_text(
        with_service(
            "- name: dns\n  clusterIP: 127.0.0.9\n  type: NodePort\n"
            "  ports: [{name: t, port: 53}, {name: u, port: 53, protocol: UDP}]\n"
        )
    )
    tcp, udp = ok.services[0].ports
    assert (tcp.protocol, udp.protocol) == ("TCP", "UDP")
    assert tcp.node_port != udp.node_port  # allocated per protocol, from different hashes
    text = with_service(
        "- name: dns\n  clusterIP: 127.0.0.9\n"
        "  ports: [{name: t, port: 53, protocol: UDP}, {name: u, port: 53, protocol: UDP}]\n"
    )
    assert problems_of(text) == [
        "services[0].ports[1].port: UDP port 53 already used by services[0].ports[0]"
    ]


def test_udp_listener_conflicts_across_services_but_not_with_tcp() -> None:
    text = with_service(
        "- {name: a, clusterIP: 127.0.0.9, ports: [{port: 53, protocol: UDP}]}\n"
        "- {name: b, clusterIP: 127.0.0.8, externalIPs: [127.0.0.9], ports: [{port: 53}]}\n"
        "- {name: c, clusterIP: 127.0.0.7, externalIPs: [127.0.0.9], ports: [{port: 53, protocol: UDP}]}\n"
    )
    assert problems_of(text) == [
        "services[2].ports[0]: externalIP listener UDP 127.0.0.9:53 conflicts with the clusterIP "
        "listener UDP 127.0.0.9:53 of default/a (services[0].ports[0])"
    ]


def test_admin_section() -> None:
    head = "apiVersion: lbd/v1\nservices: []\n"
    admin = load_text(head + "admin: {address: '[::1]:0', tokenFile: /etc/lbd/token}\n").admin
    assert (admin.address, admin.port, admin.token_file) == ("::1", 0, "/etc/lbd/token")
    admin = load_text(head + "admin: {socket: /run/lbd.sock, enabled: false}\n").admin
    assert (admin.socket, admin.enabled) == ("/run/lbd.sock", False)


@pytest.mark.parametrize(
    ("admin", "problem"),
    [
        ("{address: localhost:9180}", "admin.address: expected an IP address, got 'localhost'"),
        (
            "{address: 127.0.0.1}",
            "admin.address: expected ADDRESS:PORT such as 127.0.0.1:9180, got '127.0.0.1'",
        ),
        (
            "{address: '::1:9180'}",
            "admin.address: write an IPv6 address in brackets, as [::1]:9180, got '::1:9180'",
        ),
        ("{address: '127.0.0.1:70000'}", "admin.address: must be between 0 and 65535, got 70000"),
        (
            "{address: '127.0.0.1:9180', socket: /tmp/a.sock}",
            "admin.socket: address and socket are alternatives; set one",
        ),
        ("{tokenFile: 5}", "admin.tokenFile: expected a string, got a number"),
        ("{enabled: yes please}", "admin.enabled: expected true or false, got 'yes please'"),
        (
            "{token: abc}",
            "admin.token: unknown key (did you mean 'tokenFile'?); known keys: address, enabled, socket, tokenFile",
        ),
        ("[1]", "admin: expected a mapping, got a list"),
    ],
)
def test_bad_admin_section(admin: str, problem: str) -> None:
    assert problems_of(f"apiVersion: lbd/v1\nservices: []\nadmin: {admin}\n") == [problem]


def test_specific_listener_after_a_wildcard_one_conflicts_but_other_families_do_not() -> None:
    text = with_service(
        "- {name: b, type: NodePort, clusterIP: 127.0.0.8, ports: [{port: 80, nodePort: 30080}]}\n"
        "- {name: a, clusterIP: 127.0.0.9, ports: [{port: 30080}]}\n"
        "- {name: c, clusterIP: '::1', ports: [{port: 30080}]}\n",
        head="apiVersion: lbd/v1\nnode: {addresses: [0.0.0.0]}\n",
    )
    assert problems_of(text) == [
        "services[1].ports[0]: clusterIP listener TCP 127.0.0.9:30080 conflicts with the nodePort "
        "listener TCP 0.0.0.0:30080 of default/b (services[0].ports[0])"
    ]


def test_a_thousand_services_on_one_port_number_have_no_false_conflicts() -> None:
    # The check is linear (it was quadratic: seconds per reload at this size; see
    # benchmarks/reload_latency.py for the timing).
    services = "".join(
        f"  - {{name: s{i}, clusterIP: 127.150.{i // 250}.{i % 250 + 1}, ports: [{{port: 80}}]}}\n"
        for i in range(1000)
    )
    assert len(load_text("apiVersion: lbd/v1\nservices:\n" + services).services) == 1000


def test_workers_is_a_count_or_auto() -> None:
    assert load_text("apiVersion: lbd/v1\nservices: []\n").workers == 1
    assert load_text("apiVersion: lbd/v1\nworkers: 3\nservices: []\n").workers == 3
    auto = load_text("apiVersion: lbd/v1\nworkers: auto\nservices: []\n").workers
    assert auto == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "workers: must be between 1 and 256, got 0"),
        ("257", "workers: must be between 1 and 256, got 257"),
        ("many", "workers: expected a number of processes or 'auto', got 'many'"),
        ("1.5", "workers: expected a whole number, got a number 1.5"),
        ("true", "workers: expected a whole number, got a boolean True"),
    ],
)
def test_bad_workers(value: str, message: str) -> None:
    assert problems_of(f"apiVersion: lbd/v1\nworkers: {value}\nservices: []\n") == [message]


def test_node_address_management() -> None:
    config = load_text(
        "apiVersion: lbd/v1\nnode: {manageAddresses: true, syncPeriod: 5s}\nservices: []"
    )
    assert (config.node.manage_addresses, config.node.sync_period) == (True, 5)
    assert problems_of(
        "apiVersion: lbd/v1\nnode: {manageAddresses: yes please, syncPeriod: 0s}\nservices: []"
    ) == [
        "node.manageAddresses: expected true or false, got 'yes please'",
        "node.syncPeriod: must be greater than 0",
    ]


def test_a_json_document_is_read_as_json_with_the_same_checks() -> None:
    # The Kubernetes source hands reloads JSON: parsed by json, fifty times faster than YAML.
    text = '{"apiVersion": "lbd/v1", "services": [{"name": "a", "clusterIP": "127.0.0.9", "ports": [{"port": 1}]}]}'
    assert [s.key for s in load_text(text).services] == ["default/a"]
    assert problems_of('{"apiVersion": "lbd/v1", "workers": 1, "workers": 2}') == [
        "<test>: duplicate key 'workers'"
    ]
    assert problems_of('{"apiVersion": "lbd/v1", "workers": 1' + "0" * 5000 + "}")[0].startswith(
        "<test>: invalid JSON: Exceeds the limit"
    )
    # a YAML flow mapping is not JSON: the YAML parser reads it
    assert load_text("{apiVersion: lbd/v1, services: []}").services == ()
