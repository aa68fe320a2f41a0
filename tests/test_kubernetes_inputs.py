"""ExternalName with a real DNS server on 127.x, skipped services, manifests as input, NodePort
allocation, and the config errors of the Kubernetes fields."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import dns.message
import dns.rcode
import dns.rrset
import pytest
import yaml

from lbd.config import ConfigError, load_text
from lbd.config.loader import LoadOptions
from lbd.config.render import render_config
from tests.support import config, document, echo_backend, fresh_ip, running, until
from tests.test_kubernetes import at, name_via, refused

EXAMPLE = Path(__file__).parent.parent / "configs" / "kubernetes.yaml"


class DnsServer(asyncio.DatagramProtocol):
    """Answers A queries for any name with ``addresses`` (TTL 1), or SERVFAIL when failing."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.failing = False
        self.queries = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queries += 1
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        question = query.question[0]
        if self.failing:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif question.rdtype == dns.rdatatype.A and self.addresses:
            response.answer.append(
                dns.rrset.from_text_list(question.name, 1, "IN", "A", self.addresses)
            )
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


@contextlib.asynccontextmanager
async def dns_server() -> AsyncIterator[tuple[str, DnsServer]]:
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(DnsServer, local_addr=(fresh_ip(), 0))
    try:
        host, port = transport.get_extra_info("sockname")[:2]
        yield f"{host}:{port}", server
    finally:
        transport.close()


def external_name(dns_at: str, cluster_ip: str, port: int, target: int) -> str:
    return document(
        "  - name: svc\n"
        "    type: ExternalName\n"
        "    externalName: db.example.test\n"
        f"    clusterIP: '{cluster_ip}'\n"
        f"    ports: [{{port: {port}, targetPort: {target}}}]\n"
    ).replace("services:\n", f"dns: {{servers: ['{dns_at}'], minTtl: 100ms}}\nservices:\n")


async def test_external_name_resolves_balances_follows_ttl_and_keeps_the_last_answer() -> None:
    async with dns_server() as (dns_at, server), echo_backend("first") as (h1, p1, _):
        cluster_ip = fresh_ip()
        server.addresses = [h1]
        async with running(config(external_name(dns_at, cluster_ip, 0, p1))) as runtime:
            route = next(iter(runtime.routes.values()))
            await until(lambda: len(route.pool.members) == 1)
            assert await name_via(at(runtime)) == "first"
            server.failing = True
            seen = server.queries
            await until(lambda: server.queries > seen + 1)  # re-resolved on the TTL
            assert runtime.process.dns_resolutions_total.failure >= 1
            assert await name_via(at(runtime)) == "first"  # the last good answer is kept


async def test_external_name_switches_to_new_answers_and_to_cluster_ip_by_reload() -> None:
    async with dns_server() as (dns_at, server):
        first, second = fresh_ip(), fresh_ip()
        async with echo_backend("first", first) as (_, port, _):
            loop = asyncio.get_running_loop()
            other = await loop.create_server(
                lambda: _Named("second"), second, port
            )  # the same port number on another address: one targetPort for both answers
            try:
                cluster_ip, service_port = fresh_ip(), 20000 + os.getpid() % 9000
                server.addresses = [first]
                text = external_name(dns_at, cluster_ip, service_port, port)
                async with running(config(text)) as runtime:
                    route = next(iter(runtime.routes.values()))
                    await until(lambda: len(route.pool.members) == 1)
                    target = at(runtime)
                    assert await name_via(target) == "first"
                    server.addresses = [second]
                    await until(lambda: route.pool.members[0].address == second)
                    assert await name_via(target) == "second"
                    # ExternalName → ClusterIP by reload: the config's endpoints, no resolver.
                    cluster = document(
                        "  - name: svc\n"
                        f"    clusterIP: '{cluster_ip}'\n"
                        f"    ports: [{{port: {service_port}, targetPort: {port}}}]\n"
                        f"    endpoints: ['{first}']\n"
                    )
                    await runtime.apply(config(cluster))
                    assert not runtime.extras.resolvers
                    assert await name_via(target) == "first"
            finally:
                other.close()


class _Named(asyncio.Protocol):
    def __init__(self, name: str) -> None:
        self.name = name

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(f"{self.name}\n".encode())  # type: ignore[attr-defined]
        transport.close()


# -- 10. skipped services ---------------------------------------------------------------------


def labelled(labels: str, cluster_ip: str, extra: str = "") -> str:
    return (
        "  - name: svc\n"
        f"    clusterIP: {cluster_ip}\n"
        f"    labels: {labels}\n"
        "    ports: [{port: 0, targetPort: 1}]\n" + extra
    )


@pytest.mark.parametrize(
    ("labels", "cluster_ip", "proxy_name", "skipped"),
    [
        ("{service.kubernetes.io/service-proxy-name: other}", "127.0.0.9", None, True),
        ("{service.kubernetes.io/service-proxy-name: lbd}", "127.0.0.9", "lbd", False),
        ("{service.kubernetes.io/headless: ''}", "127.0.0.9", None, True),
        ("{app: web}", "None", None, True),
        ("{app: web}", "127.0.0.9", "lbd", False),
    ],
)
def test_services_kube_proxy_skips_are_not_proxied(
    labels: str, cluster_ip: str, proxy_name: str | None, skipped: bool
) -> None:
    loaded = load_text(document(labelled(labels, cluster_ip)), "<t>", LoadOptions(None, proxy_name))
    assert (len(loaded.skipped), len(loaded.services)) == ((1, 0) if skipped else (0, 1))


async def test_adding_a_service_proxy_name_label_by_reload_stops_proxying() -> None:
    async with echo_backend("b") as (host, port, _):
        ip = fresh_ip()
        body = labelled("{app: web}", ip, f"    endpoints: [{{address: '{host}'}}]\n").replace(
            "targetPort: 1", f"targetPort: {port}"
        )
        async with running(config(document(body))) as runtime:
            target = at(runtime)
            assert await name_via(target) == "b"
            label = "{service.kubernetes.io/service-proxy-name: other}"
            await runtime.apply(config(document(body.replace("{app: web}", label))))
            assert not runtime.listeners and await refused(target)
            await runtime.apply(config(document(body)))
            assert len(runtime.listeners) == 1


# -- 11. manifests as input --------------------------------------------------------------------


def test_kubectl_list_converts_to_the_same_model_as_its_lbd_convert_output() -> None:
    options = LoadOptions(node_name="node-a")
    from_manifests = load_text(EXAMPLE.read_text(), str(EXAMPLE), options)
    converted = yaml.safe_dump(render_config(from_manifests))
    # The same services and node; only the record of skipped services stays behind.
    again = load_text(converted, "<converted>", options)
    assert again == dataclasses.replace(from_manifests, skipped=())
    web, api, dns_service = from_manifests.services
    assert [s.service for s in from_manifests.skipped] == ["shop/db"]
    assert web.affinity_timeout == 600 and web.prefer_close
    assert [e.conditions.terminating for e in web.endpoints] == [False, False, True]
    assert api.load_balancer_ips == ("127.0.40.1",) and api.health_check_node_port == 31999
    assert from_manifests.node.addresses == ("127.0.10.1",)
    assert [p.protocol for p in dns_service.ports] == ["UDP", "TCP"]


def test_multi_document_manifests_equal_the_list_form() -> None:
    listed = yaml.safe_load(EXAMPLE.read_text())
    multi = yaml.safe_dump_all(listed["items"])
    options = LoadOptions(node_name="node-a")
    assert load_text(multi, "<m>", options) == load_text(EXAMPLE.read_text(), "<l>", options)


def test_manifest_problems_name_the_object_path() -> None:
    text = (
        "apiVersion: v1\nkind: List\nitems:\n"
        "- {apiVersion: apps/v1, kind: Deployment, metadata: {name: x}}\n"
        "- apiVersion: v1\n  kind: Service\n  metadata: {name: s}\n"
        "  spec: {clusterIP: 127.0.0.5, sessionAfinity: ClientIP, ports: [{port: 80, protocol: SCTP}]}\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_text(text, "<k>")
    problems = [str(p) for p in raised.value.problems]
    assert problems[0].startswith("items[0].kind: expected a v1 Service")
    assert any(p.startswith("items[1].spec.sessionAfinity: unknown key") for p in problems)
    assert "items[1].spec.ports[0].protocol: only TCP and UDP are supported" in problems


# -- 9. NodePort allocation ----------------------------------------------------------------------


def test_node_port_allocation_is_the_same_whatever_the_order_and_node() -> None:
    def services(order: list[str]) -> str:
        return "".join(
            f"  - name: {name}\n    type: LoadBalancer\n    clusterIP: 127.0.0.{i + 2}\n"
            f"    externalTrafficPolicy: Local\n    ports: [{{port: 80}}, ]\n".replace(
                "[{port: 80}, ]", "[{port: 80}]"
            )
            for i, name in enumerate(order)
        )

    def ports(order: list[str], node: str) -> dict[str, tuple[int | None, int | None]]:
        text = document(services(order), node=f"{{name: {node}, nodePortRange: 30000-30009}}")
        loaded = load_text(text.replace("clusterIP: 127.0.0.", "clusterIP: 127.0.1."))
        return {s.name: (s.ports[0].node_port, s.health_check_node_port) for s in loaded.services}

    names = ["a", "b", "c", "d", "e"]
    first = ports(names, "n1")
    assert first == ports(list(reversed(names)), "n2")
    used = [p for pair in first.values() for p in pair]
    assert len(set(used)) == 10 and all(p is not None and 30000 <= p <= 30009 for p in used)
    with pytest.raises(ConfigError, match="no free"):
        ports([*names, "f"], "n1")


# -- config errors of the Kubernetes fields (one per kind of bad input) ---------------------------


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ("sessionAffinity: Sticky", "sessionAffinity: must be one of None, ClientIP"),
        (
            "{sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}}",
            "timeoutSeconds: must be between 1 and 86400",
        ),
        ("sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}", "only with sessionAffinity"),
        ("externalTrafficPolicy: Local", "only for NodePort and LoadBalancer"),
        ("internalTrafficPolicy: Nearby", "internalTrafficPolicy: must be one of Cluster, Local"),
        ("trafficDistribution: PreferSame", "trafficDistribution: must be one of PreferClose"),
        ("loadBalancerSourceRanges: ['127.0.0.0/8']", "only for type LoadBalancer"),
        ("healthCheckNodePort: 30001", "only for LoadBalancer services with externalTraffic"),
        ("externalName: db.example.com", "externalName: only for type ExternalName"),
        ("type: ExternalName", "externalName: required for type ExternalName"),
        ("labels: {app: 5}", "labels.app: expected a string"),
        ("publishNotReadyAddresses: yes-please", "publishNotReadyAddresses: expected true"),
    ],
)
def test_bad_kubernetes_service_fields(extra: str, problem: str) -> None:
    if extra.startswith("{"):
        lines = "".join(f"    {item.strip()}\n" for item in _split(extra[1:-1]))
    else:
        lines = f"    {extra}\n"
    text = document(f"  - name: s\n    clusterIP: 127.0.0.7\n    ports: [{{port: 80}}]\n{lines}")
    with pytest.raises(ConfigError) as raised:
        load_text(text)
    assert any(problem in str(p) for p in raised.value.problems), raised.value.problems


def _split(text: str) -> list[str]:
    depth, start, parts = 0, 0, []
    for i, ch in enumerate(text):
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


@pytest.mark.parametrize(
    ("endpoint", "problem"),
    [
        ("{address: 127.0.0.8, ready: maybe}", "ready: expected true or false"),
        ("{address: 127.0.0.8, nodeName: 5}", "nodeName: expected a string"),
        ("{address: 127.0.0.8, zone: [a]}", "zone: expected a string"),
    ],
)
def test_bad_endpoint_conditions(endpoint: str, problem: str) -> None:
    text = document(
        f"  - name: s\n    clusterIP: 127.0.0.7\n    ports: [{{port: 80}}]\n"
        f"    endpoints: [{endpoint}]\n"
    )
    with pytest.raises(ConfigError, match=problem):
        load_text(text)


@pytest.mark.parametrize(
    ("dns", "problem"),
    [
        ("{servers: ['not-an-ip']}", "dns.servers[0]: expected an IP address"),
        ("{servers: ['127.0.0.1:99999']}", "must be between 1 and 65535"),
        ("{minTtl: 0s}", "dns.minTtl: must be greater than 0"),
        ("{minTtl: 10s, maxTtl: 5s}", "dns.maxTtl: must not be less than minTtl"),
        ("{server: []}", "dns.server: unknown key"),
    ],
)
def test_bad_dns_section(dns: str, problem: str) -> None:
    text = document("  - name: s\n    clusterIP: 127.0.0.7\n    ports: [{port: 80}]\n")
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_text(text.replace("services:\n", f"dns: {dns}\nservices:\n"))


# -- explain reports each Kubernetes reason ------------------------------------------------------


def test_explain_reports_not_ready_terminating_other_node_other_zone_affinity_source_range() -> (
    None
):
    from lbd.config.routes import route_specs
    from lbd.endpoints.explain import explain
    from lbd.endpoints.route import Route

    text = document(
        "  - name: s\n    type: LoadBalancer\n    clusterIP: 127.0.0.7\n"
        "    externalTrafficPolicy: Local\n    trafficDistribution: PreferClose\n"
        "    sessionAffinity: ClientIP\n    loadBalancerSourceRanges: ['127.0.0.2/32']\n"
        "    ports: [{port: 80, nodePort: 30080}]\n    endpoints:\n"
        "      - {address: 127.0.0.11, nodeName: node-a, zone: zone-1}\n"
        "      - {address: 127.0.0.12, nodeName: node-b, zone: zone-2}\n"
        "      - {address: 127.0.0.13, nodeName: node-a, ready: false, serving: true, terminating: true}\n"
        "      - {address: 127.0.0.14, nodeName: node-a, ready: false, serving: false}\n",
        node="{name: node-a, zone: zone-1, nodePortRange: 30000-30100}",
    )
    [spec] = route_specs(load_text(text)).values()
    route = Route(spec)

    def reasons(client: str = "", **kind: bool) -> list[str | None]:
        return [v.reason for v in explain(route, client, now=0.0, **kind)]

    assert reasons() == [None, "other_zone", "terminating", "not_ready"]
    assert reasons(external=True) == [None, "other_node", "terminating", "not_ready"]
    outside = reasons("127.0.0.3", external=True, filtered=True)
    assert outside == ["source_range", "other_node", "terminating", "not_ready"]
    # "affinity" shows once another endpoint is eligible too: without the Local policy and the
    # zone preference, a client pinned to the first endpoint may not use the second.
    assert route.affinity is not None
    route.affinity.record("127.0.0.2", route.pool.members[0], now=0.0)
    pinned = reasons("127.0.0.2", external=True, filtered=True)
    assert pinned == [None, "other_node", "terminating", "not_ready"]
    route.pool.set_policy(dataclasses.replace(route.pool.policy, external_local=False))
    pinned = reasons("127.0.0.2", external=True)
    assert pinned == [None, "other_zone", "terminating", "not_ready"]
    route.pool.set_policy(dataclasses.replace(route.pool.policy, prefer_close=False))
    assert reasons("127.0.0.2", external=True) == [None, "affinity", "terminating", "not_ready"]
