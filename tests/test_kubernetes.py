"""Kubernetes Service semantics with real sockets on 127.x; each test is named after the
Kubernetes e2e test (test/e2e/network/service.go, topology_hints.go) or behaviour it mirrors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os

import pytest

from lbd.net.tcp_listener import TcpListener
from lbd.runtime.runtime import Runtime
from tests.support import (
    config,
    document,
    echo_backend,
    echo_backends,
    fresh_ip,
    running,
    udp_client,
    udp_echo_backend,
    udp_echo_backends,
)

NODE = "{name: node-a, zone: zone-1, addresses: ['%s'], nodePortRange: 30000-32767}"


def endpoint(host: str, port: int, **conditions: object) -> str:
    extra = "".join(f", {k}: {json.dumps(v)}" for k, v in conditions.items())
    return f"      - {{address: '{host}', ports: {{p: {port}}}{extra}}}\n"


def service(
    endpoints: list[str],
    *,
    kind: str = "ClusterIP",
    extra: str = "",
    protocol: str = "TCP",
    name: str = "svc",
    port_extra: str = "",
) -> str:
    return (
        f"  - name: {name}\n"
        f"    type: {kind}\n"
        f"    clusterIP: '{fresh_ip()}'\n"
        f"    ports: [{{port: 0, targetPort: p, protocol: {protocol}{port_extra}}}]\n"
        + (f"    endpoints:\n{''.join(endpoints)}" if endpoints else "    endpoints: []\n")
        + extra
    )


def cfg(*services: str, node_ip: str | None = None):  # type: ignore[no-untyped-def]
    return config(document(*services, node=NODE % (node_ip or fresh_ip())))


async def name_via(target: tuple[str, int], source: str | None = None) -> str:
    """Connect (from ``source``), read the backend's name line."""
    local = (source, 0) if source else None
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*target, local_addr=local), 5)
    try:
        return (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def refused(target: tuple[str, int]) -> bool:
    try:
        await name_via(target)
    except ConnectionRefusedError:
        return True
    return False


def at(runtime: Runtime, kind: str = "clusterIP", name: str = "default/svc") -> tuple[str, int]:
    return runtime.listener_for(name, 0, kind).bound


# -- 1. session affinity ---------------------------------------------------------------------

AFFINITY = "    sessionAffinity: ClientIP\n"


async def test_should_have_session_affinity_work_for_service_with_type_clusterip() -> None:
    async with echo_backends(3) as backends:
        eps = [endpoint(h, p) for h, p, _ in backends]
        async with running(cfg(service(eps, extra=AFFINITY))) as runtime:
            a, b = fresh_ip(), fresh_ip()
            first_a = await name_via(at(runtime), a)
            first_b = await name_via(at(runtime), b)
            assert first_a != first_b  # round-robin gave each client its own endpoint
            for _ in range(6):
                assert await name_via(at(runtime), a) == first_a
                assert await name_via(at(runtime), b) == first_b


async def test_session_affinity_entry_is_dropped_when_its_endpoint_goes_away() -> None:
    async with echo_backends(2) as backends:
        eps = [endpoint(h, p) for h, p, _ in backends]
        ip = fresh_ip()
        async with running(cfg(service(eps, extra=AFFINITY), node_ip=ip)) as runtime:
            client = fresh_ip()
            pinned = await name_via(at(runtime), client)
            index = int(pinned.rsplit("-", 1)[1])
            kept = [eps[1 - index]]
            await runtime.apply(cfg(service(kept, extra=AFFINITY), node_ip=ip))
            # The new config has another clusterIP (fresh), so look the listener up again.
            assert await name_via(at(runtime), client) == f"backend-{1 - index}"
            route = next(iter(runtime.routes.values()))
            assert route.affinity is not None and len(route.affinity) == 1


async def test_session_affinity_can_be_switched_on_and_off_by_reload() -> None:
    async with echo_backends(2) as backends:
        eps = [endpoint(h, p) for h, p, _ in backends]
        node_ip, cluster_ip = fresh_ip(), fresh_ip()

        def text(extra: str) -> str:
            body = service(eps, extra=extra).replace(
                "clusterIP: '", f"clusterIP: '{cluster_ip}' #", 1
            )
            return document(body, node=NODE % node_ip)

        async with running(config(text(""))) as runtime:
            client = fresh_ip()
            assert len({await name_via(at(runtime), client) for _ in range(4)}) == 2
            await runtime.apply(config(text(AFFINITY)))
            assert len({await name_via(at(runtime), client) for _ in range(4)}) == 1
            await runtime.apply(config(text("")))
            assert len({await name_via(at(runtime), client) for _ in range(4)}) == 2


def test_session_affinity_timeout_expires_entries() -> None:
    from lbd.endpoints.affinity import AffinityTable
    from lbd.endpoints.endpoint import UpstreamEndpoint

    table = AffinityTable(timeout=10)
    a = UpstreamEndpoint("127.0.0.1", 1)
    table.record("127.0.0.2", a, now=100.0)
    assert table.lookup("127.0.0.2", now=109.0) is a  # within the timeout
    table.record("127.0.0.2", a, now=109.0)  # each use refreshes
    assert table.lookup("127.0.0.2", now=118.0) is a
    assert table.lookup("127.0.0.2", now=128.5) is None


async def test_should_have_session_affinity_work_for_udp() -> None:
    async with udp_echo_backends(3) as backends:
        eps = [endpoint(h, p) for h, p, _ in backends]
        text = cfg(service(eps, protocol="UDP", extra=AFFINITY))
        async with running(text) as runtime:
            source = fresh_ip()
            names = set()
            for i in range(4):  # four sockets (four sessions) from one client IP
                async with udp_client(at(runtime), local_ip=source) as client:
                    names.add((await client.ask(b"%d" % i)).split(b" ")[0])
            assert len(names) == 1


# -- 2. endpoint conditions -------------------------------------------------------------------


async def test_should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints() -> None:
    async with echo_backends(3) as backends:
        (h0, p0, _), (h1, p1, _), (h2, p2, _) = backends
        eps = [
            endpoint(h0, p0, ready=False, serving=True, terminating=True),
            endpoint(h1, p1, ready=False, serving=False, terminating=True),
            endpoint(h2, p2, ready=True),
        ]
        node_ip = fresh_ip()
        async with running(cfg(service(eps), node_ip=node_ip)) as runtime:
            assert {await name_via(at(runtime)) for _ in range(4)} == {"backend-2"}
            await runtime.apply(cfg(service(eps[:2]), node_ip=node_ip))
            # No ready endpoint: the serving-terminating one, never the not-serving one.
            assert {await name_via(at(runtime)) for _ in range(4)} == {"backend-0"}
            await runtime.apply(cfg(service(eps[1:2]), node_ip=node_ip))
            assert await refused(at(runtime))


async def test_publish_not_ready_addresses_treats_all_endpoints_as_ready() -> None:
    async with echo_backends(2) as backends:
        eps = [endpoint(h, p, ready=False, serving=False) for h, p, _ in backends]
        extra = "    publishNotReadyAddresses: true\n"
        async with running(cfg(service(eps, extra=extra))) as runtime:
            assert {await name_via(at(runtime)) for _ in range(4)} == {"backend-0", "backend-1"}


# -- 3. traffic policies ------------------------------------------------------------------------


async def test_should_respect_internal_traffic_policy_local_pod_to_pod() -> None:
    async with echo_backends(2) as backends:
        (h0, p0, _), (h1, p1, _) = backends
        eps = [endpoint(h0, p0, nodeName="node-b"), endpoint(h1, p1, nodeName="node-a")]
        extra = "    internalTrafficPolicy: Local\n"
        node_ip = fresh_ip()
        async with running(cfg(service(eps, extra=extra), node_ip=node_ip)) as runtime:
            assert {await name_via(at(runtime)) for _ in range(4)} == {"backend-1"}
            await runtime.apply(cfg(service(eps[:1], extra=extra), node_ip=node_ip))
            assert await refused(at(runtime))  # no local endpoint: no fallback to node-b


async def test_external_traffic_policy_local_applies_to_node_ports_not_the_cluster_ip() -> None:
    async with echo_backends(2) as backends:
        (h0, p0, _), (h1, p1, _) = backends
        eps = [endpoint(h0, p0, nodeName="node-b"), endpoint(h1, p1, nodeName="node-a")]
        node_port = 30000 + os.getpid() % 2700
        extra = "    externalTrafficPolicy: Local\n"
        text = cfg(
            service(eps, kind="NodePort", extra=extra, port_extra=f", nodePort: {node_port}")
        )
        async with running(text) as runtime:
            assert {await name_via(at(runtime, "nodePort")) for _ in range(4)} == {"backend-1"}
            assert {await name_via(at(runtime)) for _ in range(4)} == {"backend-0", "backend-1"}


async def test_udp_with_no_local_endpoint_is_port_unreachable() -> None:
    async with udp_echo_backends(1) as [(host, port, _)]:
        eps = [endpoint(host, port, nodeName="node-b")]
        extra = "    internalTrafficPolicy: Local\n"
        async with running(cfg(service(eps, protocol="UDP", extra=extra))) as runtime:
            async with udp_client(at(runtime)) as client:
                client.send(b"x")
                with pytest.raises(ConnectionRefusedError):
                    await client.recv(5)


# -- 4. trafficDistribution ---------------------------------------------------------------------


async def test_should_prefer_endpoints_in_the_same_zone_with_traffic_distribution_prefer_close() -> (
    None
):
    async with echo_backends(2) as backends:
        (h0, p0, _), (h1, p1, _) = backends
        eps = [endpoint(h0, p0, zone="zone-2"), endpoint(h1, p1, zone="zone-1")]
        extra = "    trafficDistribution: PreferClose\n"
        node_ip = fresh_ip()
        async with running(cfg(service(eps, extra=extra), node_ip=node_ip)) as runtime:
            assert {await name_via(at(runtime)) for _ in range(4)} == {"backend-1"}
            gone = [eps[0], endpoint(h1, p1, zone="zone-1", ready=False, serving=False)]
            await runtime.apply(cfg(service(gone, extra=extra), node_ip=node_ip))
            assert {await name_via(at(runtime)) for _ in range(4)} == {"backend-0"}


# -- 5. loadBalancerSourceRanges -----------------------------------------------------------------


async def test_should_only_allow_access_from_service_loadbalancer_source_ranges() -> None:
    async with echo_backends(1) as [(host, port, _)]:
        allowed, denied, lb_ip = fresh_ip(), fresh_ip(), fresh_ip()
        node_port = 30000 + (os.getpid() + 7) % 2700
        extra = (
            f"    loadBalancerIPs: ['{lb_ip}']\n    loadBalancerSourceRanges: ['{allowed}/32']\n"
        )
        text = cfg(
            service(
                [endpoint(host, port)],
                kind="LoadBalancer",
                extra=extra,
                port_extra=f", nodePort: {node_port}",
            )
        )
        async with running(text) as runtime:
            lb = at(runtime, "loadBalancerIP")
            assert await name_via(lb, allowed) == "backend-0"
            with pytest.raises(ConnectionResetError):
                await name_via(lb, denied)
            route = next(iter(runtime.routes.values()))
            assert route.stats.downstream_cx_refused_total.source_range == 1
            # NodePorts are not subject to the ranges, as in Kubernetes.
            assert await name_via(at(runtime, "nodePort"), denied) == "backend-0"


async def test_source_ranges_apply_to_the_client_a_trusted_proxy_header_names() -> None:
    from lbd.net import proxy_protocol

    async with echo_backends(1) as [(host, port, _)]:
        proxy, allowed, denied, lb_ip = fresh_ip(), fresh_ip(), fresh_ip(), fresh_ip()
        extra = (
            f"    loadBalancerIPs: ['{lb_ip}']\n    loadBalancerSourceRanges: ['{allowed}/32']\n"
            f"    acceptProxyProtocolFrom: ['{proxy}/32']\n"
        )
        text = cfg(service([endpoint(host, port)], kind="LoadBalancer", extra=extra))
        async with running(text) as runtime:
            lb = at(runtime, "loadBalancerIP")

            async def via_proxy(client: str) -> str:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(*lb, local_addr=(proxy, 0)), 5
                )
                try:
                    writer.write(proxy_protocol.build_v1((client, 40000), lb))
                    return (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
                finally:
                    writer.close()

            assert await via_proxy(allowed) == "backend-0"
            # The proxy itself is outside the ranges: what counts is the client it names.
            with pytest.raises(ConnectionResetError):
                await via_proxy(denied)
            route = next(iter(runtime.routes.values()))
            assert route.stats.downstream_cx_refused_total.source_range == 1


# -- 6. healthCheckNodePort --------------------------------------------------------------------


async def http_get(host: str, port: int) -> tuple[int, dict[str, object]]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n")
        response = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def test_should_serve_health_check_node_port_for_local_traffic_policy() -> None:
    async with echo_backends(1) as [(host, port, _)]:
        node_ip = fresh_ip()
        health = 30000 + (os.getpid() + 13) % 2700
        node_port = 30000 + (os.getpid() + 14) % 2700

        def text(ready: bool):  # type: ignore[no-untyped-def]
            extra = f"    externalTrafficPolicy: Local\n    healthCheckNodePort: {health}\n"
            eps = [endpoint(host, port, nodeName="node-a", ready=ready)]
            body = service(
                eps, kind="LoadBalancer", extra=extra, port_extra=f", nodePort: {node_port}"
            )
            return cfg(body, node_ip=node_ip)

        async with running(text(True)) as runtime:
            status, body = await http_get(node_ip, health)
            assert status == 200
            assert body == {
                "service": {"namespace": "default", "name": "svc"},
                "localEndpoints": 1,
                "serviceProxyHealthy": True,
            }
            await runtime.apply(text(False))
            status, body = await http_get(node_ip, health)
            assert (status, body["localEndpoints"]) == (503, 0)


# -- 8. named targetPorts, TCP and UDP on one port ------------------------------------------------


async def test_named_target_port_maps_to_different_numbers_on_different_endpoints() -> None:
    async with echo_backends(2) as backends:
        eps = [endpoint(h, p) for h, p, _ in backends]
        assert backends[0][1] != backends[1][1]
        async with running(cfg(service(eps))) as runtime:
            assert {await name_via(at(runtime)) for _ in range(4)} == {"backend-0", "backend-1"}


async def test_should_serve_the_same_port_on_tcp_and_udp() -> None:
    """One endpoint serves a port name per protocol, as a DNS server does (53/UDP, 53/TCP)."""
    ip = fresh_ip()
    async with echo_backend("tcp", ip) as (_, tp, _), udp_echo_backend("udp", ip) as (_, up, _):
        port = 20000 + os.getpid() % 9000
        cluster_ip = fresh_ip()
        text = document(
            "  - name: dns\n"
            f"    clusterIP: '{cluster_ip}'\n"
            f"    ports: [{{name: dns, protocol: UDP, port: {port}, targetPort: dns}},\n"
            f"            {{name: dns-tcp, protocol: TCP, port: {port}, targetPort: dns-tcp}}]\n"
            f"    endpoints: [{{address: '{ip}', ports: {{dns: {up}, dns-tcp: {tp}}}}}]\n"
        )
        async with running(config(text)):
            assert await name_via((cluster_ip, port)) == "tcp"
            async with udp_client((cluster_ip, port)) as client:
                assert await client.ask(b"q") == b"udp q"


# -- 12. REJECT: listening again when an endpoint returns ---------------------------------------


async def test_should_be_rejected_and_then_served_when_an_endpoint_becomes_ready() -> None:
    async with echo_backends(1) as [(host, port, _)]:
        node_ip, cluster_ip = fresh_ip(), fresh_ip()

        def text(ready: bool):  # type: ignore[no-untyped-def]
            body = service([endpoint(host, port, ready=ready, serving=ready)])
            body = body.replace("clusterIP: '", f"clusterIP: '{cluster_ip}' #", 1)
            return cfg(body, node_ip=node_ip)

        async with running(text(False)) as runtime:
            target = at(runtime)
            assert await refused(target)
            await runtime.apply(text(True))
            listener = runtime.listener_for("default/svc")
            assert isinstance(listener.net, TcpListener)
            tcp = listener.net
            assert tcp.is_open  # listening again before apply returned
            assert at(runtime) == target  # the same address and port, port 0 resolved once
            assert await name_via(target) == "backend-0"
            await runtime.apply(text(False))
            assert await refused(target)
