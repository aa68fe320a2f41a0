"""A small network made of namespaces, for lbd as it runs on real nodes (root only).

    client ── router ── switch (a bridge) ── node-1, node-2 (lbd), backend-1..3

- client host: 10.201.0.2/20 on the client LAN, plus ``CLIENTS`` more addresses in it
  (10.201.1.0 and up) so that many distinct clients can connect; default route: the router.
- router: 10.201.0.1/20 and 10.201.16.1/24; forwards; hashes multipath routes on layer 4
  (``fib_multipath_hash_policy=1``, set inside the router namespace only). Routes, as a
  cluster's network would have them: ClusterIPs (10.96.0.0/16) to node-1, external IPs
  (10.97.0.0/16) to node-2, LoadBalancer IPs 10.98.1.0/24 to node-1, and the ECMP
  LoadBalancer IP ``ECMP_IP`` to both nodes at once (MetalLB's BGP mode, or a cloud's).
- node LAN 10.201.16.0/24 on a bridge in the switch namespace (not the root one): node-1 .11,
  node-2 .12, backend-1 .21 and .24, backend-2 .22 and .25, backend-3 .23. Each backend address
  runs tests/netbackend.py: TCP 8080, PROXY-reading TCP 8081, UDP 8053.

Addresses exist only in these namespaces and no route leads out of them. Everything is removed
at the end, also when a test fails or is interrupted (``tests.netlab``); a run that was killed
is cleaned up by the next one.
"""

from __future__ import annotations

import contextlib
import select
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.netlab import HERE, NETNS_SKIP, Lab, lab
from tests.procs import LbdProcess, lbd_process

CLIENT = "10.201.0.2"
ROUTER_CLIENT_SIDE, ROUTER = "10.201.0.1", "10.201.16.1"
NODES = {"node-1": "10.201.16.11", "node-2": "10.201.16.12"}
BACKENDS = {
    "backend-1": ("10.201.16.21", "10.201.16.24"),
    "backend-2": ("10.201.16.22", "10.201.16.25"),
    "backend-3": ("10.201.16.23",),
}
ENDPOINTS = [address for addresses in BACKENDS.values() for address in addresses]
ECMP_IP = "10.98.0.10"
CLIENTS = 600
TOPOLOGY_TESTS = [pytest.mark.slow, NETNS_SKIP]  # a test module's pytestmark
TCP_PORT, PROXY_PORT, UDP_PORT = 8080, 8081, 8053


def client_address(index: int) -> str:
    """The index-th extra client address (10.201.1.0, 10.201.1.1, ...)."""
    return f"10.201.{1 + index // 256}.{index % 256}"


@dataclass
class Topology:
    net: Lab
    backends: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def ns(self, host: str) -> str:
        return self.net.ns(host)

    def route_ecmp(self, *nodes: str) -> None:
        """The router's route to ECMP_IP: one nexthop per node (what BGP would install)."""
        hops = [word for node in nodes for word in ("nexthop", "via", NODES[node])]
        self.net.ip("router", "route", "replace", f"{ECMP_IP}/32", *hops)


def _build(net: Lab) -> Topology:
    for host in ("client", "router", "switch", *NODES, *BACKENDS):
        net.host(host)
    net.ip("switch", "link", "add", "br0", "type", "bridge")
    net.ip("switch", "link", "set", "br0", "up")
    client_end, router_end = net.link("client", "router")
    net.ip("client", "addr", "add", f"{CLIENT}/20", "dev", client_end)
    batch = "".join(
        f"address add {client_address(i)}/20 dev {client_end}\n" for i in range(CLIENTS)
    )
    subprocess.run(
        ["ip", "-n", net.ns("client"), "-batch", "-"], input=batch, text=True, check=True
    )
    net.ip("client", "route", "add", "default", "via", ROUTER_CLIENT_SIDE)
    net.ip("router", "addr", "add", f"{ROUTER_CLIENT_SIDE}/20", "dev", router_end)
    lan = {"router": (ROUTER,), **{n: (a,) for n, a in NODES.items()}, **BACKENDS}
    for host, addresses in lan.items():
        host_end, switch_end = net.link(host, "switch")
        net.ip("switch", "link", "set", switch_end, "master", "br0")
        for address in addresses:
            net.ip(host, "addr", "add", f"{address}/24", "dev", host_end)
        if host != "router":
            net.ip(host, "route", "add", "default", "via", ROUTER)
    net.sysctl("router", "net.ipv4.ip_forward", "1")
    net.sysctl("router", "net.ipv4.fib_multipath_hash_policy", "1")
    net.ip("router", "route", "add", "10.96.0.0/16", "via", NODES["node-1"])
    net.ip("router", "route", "add", "10.97.0.0/16", "via", NODES["node-2"])
    net.ip("router", "route", "add", "10.98.1.0/24", "via", NODES["node-1"])
    topology = Topology(net)
    topology.route_ecmp(*NODES)
    return topology


def _start_backends(topology: Topology) -> None:
    for host, addresses in BACKENDS.items():
        sockets = [
            f"{kind}:{address}:{port}"
            for address in addresses
            for kind, port in (("tcp", TCP_PORT), ("proxy", PROXY_PORT), ("udp", UDP_PORT))
        ]
        process = subprocess.Popen(
            topology.net.exec(host, sys.executable, str(HERE / "netbackend.py"), *sockets),
            stdout=subprocess.PIPE,
        )
        topology.backends.append(process)
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 10)
        assert ready and process.stdout.readline() == b"ready\n", f"{host} did not start"


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    with lab() as net:
        try:
            built = _build(net)
        except RuntimeError as error:
            pytest.skip(f"cannot build the test network here: {error}")
        try:
            _start_backends(built)
            yield built
        finally:
            for process in built.backends:
                if process.poll() is None:
                    process.kill()  # ours, by PID
                process.wait(10)
                if process.stdout is not None:
                    process.stdout.close()


@dataclass
class Node:
    name: str
    lbd: LbdProcess
    path: Path


def node_config(name: str, services: str, admin: bool = False) -> str:
    """A node's lbd config: its own address for NodePorts, addresses managed."""
    return (
        "apiVersion: lbd/v1\n"
        f"admin: {{enabled: {str(admin).lower()}}}\n"
        f"node: {{name: {name}, addresses: ['{NODES[name]}'], manageAddresses: true}}\n"
        f"services:\n{services}"
    )


@contextlib.asynccontextmanager
async def nodes(topology: Topology, tmp_path: Path, services: str) -> AsyncIterator[list[Node]]:
    """lbd on every node with the same services; stopped (by PID) on the way out."""
    async with contextlib.AsyncExitStack() as stack:
        started = []
        for name in NODES:
            path = tmp_path / f"{name}.yaml"
            path.write_text(node_config(name, services))
            wrapper = topology.net.exec(name)
            lbd = await stack.enter_async_context(lbd_process(path, wrapper=wrapper))
            started.append(Node(name, lbd, path))
        for node in started:
            await node.lbd.wait_event("lbd started", timeout=20)
        yield started


def endpoint_list(addresses: list[str], local: dict[str, str] | None = None) -> str:
    """Endpoints in flow style with the named ports p, proxy and dns, and their nodeName."""
    ports = {"p": TCP_PORT, "proxy": PROXY_PORT, "dns": UDP_PORT}
    items = []
    for address in addresses:
        node = f", nodeName: {local[address]}" if local and address in local else ""
        named = ", ".join(f"{k}: {v}" for k, v in ports.items())
        items.append(f"{{address: '{address}', ports: {{{named}}}{node}}}")
    return "[" + ", ".join(items) + "]"
