"""The UDP data path with real sockets on 127.x: sessions, expiry, endpoint changes, errors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import Counter

import pytest

from lbd.net.udp_listener import UdpListener
from lbd.runtime.listeners import Listener
from lbd.runtime.runtime import Runtime
from tests.support import (
    UdpClient,
    address_of,
    config,
    dead_port,
    document,
    echo_backend,
    fresh_ip,
    read_name,
    running,
    service_yaml,
    udp_client,
    udp_echo_backend,
    udp_echo_backends,
    until,
)


def udp_of(listener: Listener) -> UdpListener:
    assert isinstance(listener.net, UdpListener)
    return listener.net


def udp_service(endpoints: list[tuple[str, int]], extra: str = "", **kwargs: object) -> str:
    return document(service_yaml("svc", endpoints, protocol="UDP", extra=extra, **kwargs))  # type: ignore[arg-type]


def udp_route(runtime: Runtime):  # type: ignore[no-untyped-def]
    return runtime.listener_for("default/svc").route


def sessions_of(runtime: Runtime) -> int:
    udp = udp_of(runtime.listener_for("default/svc"))
    assert udp is not None
    return len(udp.sessions)


async def name_of(client: UdpClient, payload: bytes = b"ping", timeout: float = 5.0) -> str:
    reply = await client.ask(payload, timeout)
    name, _, echoed = reply.partition(b" ")
    assert echoed == payload
    return name.decode()


async def test_a_client_sticks_to_one_endpoint_through_one_upstream_socket() -> None:
    async with udp_echo_backends(3) as backends:
        async with running(config(udp_service([(h, p) for h, p, _ in backends]))) as runtime:
            async with udp_client(address_of(runtime)) as client:
                names = {await name_of(client, b"%d" % i) for i in range(20)}
            assert len(names) == 1
            [chosen] = [stats for _, _, stats in backends if stats.datagrams]
            assert chosen.datagrams == 20 and len(chosen.peers) == 1
            assert udp_route(runtime).stats.udp_sess_total == 1


async def test_many_clients_spread_over_endpoints() -> None:
    async with udp_echo_backends(3) as backends:
        async with running(config(udp_service([(h, p) for h, p, _ in backends]))) as runtime:
            target = address_of(runtime)
            names: Counter[str] = Counter()
            for _ in range(30):
                # Each client from its own 127.x source address: 30 distinct sessions.
                async with udp_client(target, local_ip=fresh_ip()) as client:
                    names[await name_of(client)] += 1
            assert names == {"backend-0": 10, "backend-1": 10, "backend-2": 10}
            assert sessions_of(runtime) == 30


async def test_replies_come_from_the_address_the_client_sent_to_on_every_listener_kind() -> None:
    """The clients are connected sockets: a reply from any other source would be dropped."""
    node_ip, lb_ip, ext_ip = fresh_ip(), fresh_ip(), fresh_ip()
    node_port = 30000 + os.getpid() % 2700
    async with udp_echo_backend("only") as (bh, bp, _):
        text = document(
            "  - name: svc\n"
            "    type: LoadBalancer\n"
            f"    clusterIP: {fresh_ip()}\n"
            f"    externalIPs: [{ext_ip}]\n"
            f"    loadBalancerIPs: [{lb_ip}]\n"
            f"    ports: [{{port: 0, protocol: UDP, targetPort: {bp}, nodePort: {node_port}}}]\n"
            f"    endpoints: [{bh}]\n",
            node=f"{{addresses: [{node_ip}]}}",
        )
        async with running(config(text)) as runtime:
            kinds = {listener.spec.kind: listener.bound for listener in runtime.listeners.values()}
            assert set(kinds) == {"clusterIP", "externalIP", "nodePort", "loadBalancerIP"}
            assert kinds["nodePort"] == (node_ip, node_port)
            for target in kinds.values():
                async with udp_client(target) as client:
                    assert await name_of(client) == "only"


def free_wildcard_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", 0))
        return int(sock.getsockname()[1])


async def test_wildcard_node_address_replies_from_each_destination_address() -> None:
    """A NodePort on 0.0.0.0: IP_PKTINFO says where each datagram was sent, and the reply
    leaves from there; the same client sending to two addresses has two sessions."""
    node_port = free_wildcard_udp_port()
    async with udp_echo_backend("only") as (bh, bp, _):
        text = document(
            "  - name: svc\n"
            "    type: NodePort\n"
            f"    clusterIP: {fresh_ip()}\n"
            f"    ports: [{{port: 0, protocol: UDP, targetPort: {bp}, nodePort: {node_port}}}]\n"
            f"    endpoints: [{bh}]\n",
            node="{addresses: [0.0.0.0], nodePortRange: 1024-65535}",
        )
        async with running(config(text)) as runtime:
            assert address_of(runtime, kind="nodePort") == ("0.0.0.0", node_port)
            source = fresh_ip()
            for destination in (fresh_ip(), fresh_ip()):
                async with udp_client((destination, node_port), local_ip=source) as client:
                    assert await name_of(client) == "only"
            udp = udp_of(runtime.listener_for("default/svc", kind="nodePort"))
            assert udp is not None and len(udp.sessions) == 2


async def test_ipv6_wildcard_node_address_replies_from_the_destination_address() -> None:
    """A NodePort on '::': IPV6_PKTINFO says where each datagram was sent, and the reply leaves
    from there (a connected client accepts nothing else)."""
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
        probe.bind(("::", 0))
        node_port = int(probe.getsockname()[1])
    async with udp_echo_backend("six", address="::1") as (bh, bp, _):
        text = document(
            "  - name: svc\n"
            "    type: NodePort\n"
            "    clusterIP: '::1'\n"
            f"    ports: [{{port: 0, protocol: UDP, targetPort: {bp}, nodePort: {node_port}}}]\n"
            f"    endpoints: ['{bh}']\n",
            node="{addresses: ['::'], nodePortRange: 1024-65535}",
        )
        async with running(config(text)) as runtime:
            assert address_of(runtime, kind="nodePort") == ("::", node_port)
            async with udp_client(("::1", node_port), local_ip="::1") as client:
                assert await name_of(client) == "six"
            udp = udp_of(runtime.listener_for("default/svc", kind="nodePort"))
            assert udp is not None and len(udp.sessions) == 1


async def test_empty_datagrams_pass_both_ways() -> None:
    """A zero-length datagram is still a datagram (some protocols send them as keepalives).
    asyncio's datagram transports drop them on send, so both ends here are plain sockets."""
    loop = asyncio.get_running_loop()
    backend = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    backend.bind((fresh_ip(), 0))
    backend.setblocking(False)
    received: asyncio.Queue[bytes] = asyncio.Queue()

    def echo() -> None:
        data, peer = backend.recvfrom(65535)
        received.put_nowait(data)
        backend.sendto(data, peer)

    loop.add_reader(backend.fileno(), echo)
    try:
        async with running(config(udp_service([backend.getsockname()]))) as runtime:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.bind((fresh_ip(), 0))
                client.connect(address_of(runtime))
                client.setblocking(False)
                client.send(b"")
                assert await asyncio.wait_for(received.get(), 5) == b""
                assert await asyncio.wait_for(loop.sock_recv(client, 65535), 5) == b""
                client.send(b"after")  # the session goes on
                assert await asyncio.wait_for(received.get(), 5) == b"after"
                assert await asyncio.wait_for(loop.sock_recv(client, 65535), 5) == b"after"
    finally:
        loop.remove_reader(backend.fileno())
        backend.close()


async def test_largest_datagrams_pass_intact_both_ways() -> None:
    payloads = [os.urandom(65507), os.urandom(1), os.urandom(9000), os.urandom(65507)]
    async with udp_echo_backend() as (bh, bp, _):
        async with running(config(udp_service([(bh, bp)]))) as runtime:
            async with udp_client(address_of(runtime)) as client:
                for payload in payloads:
                    assert await client.ask(payload) == payload


async def test_ipv6_service() -> None:
    async with udp_echo_backend("six", address="::1") as (bh, bp, _):
        text = udp_service([(bh, bp)], cluster_ip="::1")
        async with running(config(text)) as runtime:
            async with udp_client(address_of(runtime), local_ip="::1") as client:
                assert await name_of(client) == "six"


async def test_idle_sessions_expire_and_active_ones_do_not() -> None:
    async with udp_echo_backend("b") as (bh, bp, stats):
        text = udp_service([(bh, bp)], extra="    udpIdleTimeout: 300ms\n")
        async with running(config(text)) as runtime:
            route = udp_route(runtime)
            async with udp_client(address_of(runtime)) as client:
                for _ in range(8):  # 800 ms of traffic, every 100 ms: never idle for 300 ms
                    assert await name_of(client) == "b"
                    await asyncio.sleep(0.1)
                assert (
                    route.stats.udp_sess_ended_total.idle_timeout == 0 and sessions_of(runtime) == 1
                )
                await until(lambda: route.stats.udp_sess_ended_total.idle_timeout == 1)
                assert sessions_of(runtime) == 0
                assert await name_of(client) == "b"  # a new session, a new upstream socket
            assert route.stats.udp_sess_total == 2 and len(stats.peers) == 2


async def test_removed_endpoint_sessions_move_on_the_next_datagram() -> None:
    """A reload that drops an endpoint: its sessions end at once, the others keep their
    upstream socket (no lost replies), and the moved client's next datagram is answered."""
    async with udp_echo_backends(2) as backends:
        targets = {f"backend-{i}": (h, p, s) for i, (h, p, s) in enumerate(backends)}
        async with running(config(udp_service([(h, p) for h, p, _ in backends]))) as runtime:
            route = udp_route(runtime)
            target = address_of(runtime)
            async with udp_client(target) as first, udp_client(target) as second:
                gone = await name_of(first)
                kept = await name_of(second)
                assert {gone, kept} == set(targets)
                kept_host, kept_port, kept_stats = targets[kept]
                route.pool.update([(kept_host, kept_port, 1)])
                assert (
                    route.stats.udp_sess_ended_total.endpoint_gone == 1
                    and sessions_of(runtime) == 1
                )
                assert await name_of(first) == kept
                assert await name_of(second) == kept
            assert len(kept_stats.peers) == 2  # second kept its socket; first got a new one
            assert route.stats.udp_sess_total == 3


async def test_endpoint_with_weight_zero_loses_its_sessions() -> None:
    async with udp_echo_backends(2) as backends:
        (h0, p0, _), (h1, p1, _) = backends
        async with running(config(udp_service([(h0, p0), (h1, p1)]))) as runtime:
            route = udp_route(runtime)
            async with udp_client(address_of(runtime)) as client:
                first = await name_of(client)
                weights = {"backend-0": 1, "backend-1": 1, first: 0}
                route.pool.update([(h0, p0, weights["backend-0"]), (h1, p1, weights["backend-1"])])
                assert await name_of(client) != first


async def test_reload_with_the_same_endpoints_keeps_every_session() -> None:
    async with udp_echo_backends(2) as backends:
        (h0, p0, s0), (h1, p1, _) = backends
        async with running(config(udp_service([(h0, p0)]))) as runtime:
            route = udp_route(runtime)
            async with udp_client(address_of(runtime)) as client:
                assert await name_of(client) == "backend-0"
                route.pool.update([(h0, p0, 1), (h1, p1, 1)])
                route.pool.update([(h0, p0, 2), (h1, p1, 1)])
                for _ in range(5):
                    assert await name_of(client) == "backend-0"
            assert route.stats.udp_sess_total == 1 and len(s0.peers) == 1


async def test_no_endpoint_is_port_unreachable_and_the_first_endpoint_gets_the_next_datagram() -> (
    None
):
    async with udp_echo_backend("late") as (bh, bp, stats):
        async with running(config(udp_service([]))) as runtime:
            route = udp_route(runtime)
            async with udp_client(address_of(runtime)) as client:
                client.send(b"anyone?")
                with pytest.raises(ConnectionRefusedError):
                    await client.recv()
                route.pool.update([(bh, bp, 1)])
                assert await name_of(client) == "late"  # the very next datagram
                route.pool.update([])
                assert (
                    route.stats.udp_sess_ended_total.endpoint_gone == 1
                    and sessions_of(runtime) == 0
                )
                client.send(b"gone?")
                with pytest.raises(ConnectionRefusedError):
                    await client.recv()
            assert stats.datagrams == 1


async def test_sessions_beyond_the_cap_are_dropped_and_counted() -> None:
    async with udp_echo_backend("b") as (bh, bp, _):
        text = udp_service([(bh, bp)], extra="    maxUdpSessions: 2\n")
        async with running(config(text)) as runtime:
            route = udp_route(runtime)
            target = address_of(runtime)
            async with udp_client(target) as a, udp_client(target) as b, udp_client(target) as c:
                assert await name_of(a) == "b" and await name_of(b) == "b"
                c.send(b"third")
                await until(lambda: route.stats.udp_sess_dropped_total.overflow == 1)
                assert await name_of(a) == "b" and await name_of(b) == "b"
                assert sessions_of(runtime) == 2
                assert c.protocol.received.empty()


async def test_endpoint_icmp_error_ends_the_session_and_the_listener_serves_on() -> None:
    """Half the clients land on an endpoint with nothing listening: its ICMP port unreachable
    ends their session, the listener serves everyone else, and their next datagram picks
    again, so a retrying client gets through."""
    dead_host = fresh_ip()
    dead = (dead_host, dead_port(dead_host))
    async with udp_echo_backend("live") as (bh, bp, _):
        async with running(config(udp_service([dead, (bh, bp)]))) as runtime:
            route = udp_route(runtime)
            target = address_of(runtime)
            async with contextlib.AsyncExitStack() as stack:
                clients = [await stack.enter_async_context(udp_client(target)) for _ in range(4)]
                for client in clients:
                    client.send(b"hello")
                await until(lambda: route.stats.udp_errors_total.upstream_icmp == 2)
                udp = udp_of(runtime.listener_for("default/svc"))
                assert udp is not None and len(udp.sessions) == 2
                lucky = [c for c in clients if c.local in udp.sessions]
                for client in lucky:
                    assert await client.recv() == b"live hello"
                for client in clients:
                    if client in lucky:
                        continue
                    for _ in range(4):  # bounded retries, as a DNS resolver does
                        try:
                            assert await name_of(client, b"again", timeout=1.0) == "live"
                            break
                        except TimeoutError:
                            continue
                    else:
                        pytest.fail("a client never got through")
                assert len(udp.sessions) == 4


async def test_same_port_number_on_tcp_and_udp() -> None:
    cluster_ip = fresh_ip()
    async with echo_backend("tcp") as (th, tp, _), udp_echo_backend("udp") as (uh, up, _):
        text = document(
            "  - name: dns\n"
            f"    clusterIP: {cluster_ip}\n"
            "    ports:\n"
            "      - {name: dns-tcp, port: 5353, protocol: TCP, targetPort: dns-tcp}\n"
            "      - {name: dns-udp, port: 5353, protocol: UDP, targetPort: dns-udp}\n"
            "    endpoints:\n"
            f"      - {{address: {th}, ports: {{dns-tcp: {tp}, dns-udp: 1}}}}\n"
            f"      - {{address: {uh}, ports: {{dns-tcp: 1, dns-udp: {up}}}}}\n"
        )
        cfg = config(text)
        # Only one endpoint serves each protocol here: drop the other from each pool.
        async with running(cfg) as runtime:
            tcp = runtime.listener_for("default/dns", 0)
            udp = runtime.listener_for("default/dns", 1)
            tcp.route.pool.update([(th, tp, 1)])
            udp.route.pool.update([(uh, up, 1)])
            assert tcp.bound == udp.bound == (cluster_ip, 5353)
            assert await read_name(cluster_ip, 5353) == "tcp"
            async with udp_client((cluster_ip, 5353)) as client:
                assert await name_of(client) == "udp"


async def test_shutdown_ends_sessions_and_closes_sockets() -> None:
    async with udp_echo_backend("b") as (bh, bp, _):
        async with running(config(udp_service([(bh, bp)]))) as runtime:
            route = udp_route(runtime)
            async with udp_client(address_of(runtime)) as client:
                assert await name_of(client) == "b"
                runtime.stop_accepting()
                assert route.stats.udp_sess_active == 0 and sessions_of(runtime) == 0
                client.send(b"after")
                with pytest.raises(ConnectionRefusedError):
                    await client.recv()


async def test_reload_through_the_runtime_keeps_sessions_of_endpoints_that_stay() -> None:
    async with udp_echo_backends(2) as backends:
        (h0, p0, s0), (h1, p1, _) = backends
        ip = fresh_ip()
        async with running(config(udp_service([(h0, p0)], cluster_ip=ip))) as runtime:
            [listener] = runtime.listeners.values()
            async with udp_client(address_of(runtime)) as client:
                assert await name_of(client) == "backend-0"
                diff = await runtime.apply(config(udp_service([(h0, p0), (h1, p1)], cluster_ip=ip)))
                assert not diff.listeners_added and not diff.listeners_removed
                assert list(runtime.listeners.values()) == [listener]
                for _ in range(3):
                    assert await name_of(client) == "backend-0"
                await runtime.apply(config(udp_service([(h1, p1)], cluster_ip=ip)))
                assert await name_of(client) == "backend-1"  # its endpoint went: moved at once
            assert len(s0.peers) == 1  # one upstream socket throughout the first reload


async def test_proxy_protocol_v2_header_precedes_every_datagram() -> None:
    from lbd.net import proxy_protocol

    received: list[bytes] = []
    got = asyncio.Event()

    class Recorder(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            received.append(data)
            self.transport.sendto(b"ok", addr)  # type: ignore[attr-defined]
            got.set()

    loop = asyncio.get_running_loop()
    backend_ip = fresh_ip()
    transport, _ = await loop.create_datagram_endpoint(Recorder, local_addr=(backend_ip, 0))
    try:
        bp = transport.get_extra_info("sockname")[1]
        text = udp_service([(backend_ip, bp)], extra="    proxyProtocol: v2\n")
        async with running(config(text)) as runtime:
            listen = address_of(runtime)
            client_ip = fresh_ip()
            async with udp_client(listen, local_ip=client_ip) as client:
                for payload in (b"first", b"second"):
                    assert await client.ask(payload) == b"ok"
                local = client.local
            for data, payload in zip(received, (b"first", b"second"), strict=True):
                length, source, destination = proxy_protocol.parse(data)  # type: ignore[misc]
                assert source == (client_ip, local[1]) and destination == listen
                assert data[length:] == payload
                assert data[13] == 0x12  # AF_INET + DGRAM
    finally:
        transport.close()


def test_proxy_protocol_v1_is_refused_on_a_udp_service() -> None:
    from lbd.config import ConfigError

    with pytest.raises(ConfigError, match="v1 carries TCP only"):
        config(udp_service([("127.0.0.1", 53)], extra="    proxyProtocol: v1\n"))
