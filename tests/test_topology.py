"""Services reached from another host, through a router, as on a real node (tests/topology.py).

Every kind of service address, TCP and UDP: a ClusterIP the router sends to node-1, a NodePort
on each node's own address, a LoadBalancer IP and an external IP; and the Service semantics
that depend on who the client really is (loadBalancerSourceRanges, ClientIP affinity,
externalTrafficPolicy: Local with the client's address passed on in a PROXY header). Both nodes
run lbd with node.manageAddresses, which is what makes the routed addresses local to them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tests.netlab import ask, replies
from tests.topology import (
    CLIENT,
    NODES,
    PROXY_PORT,
    TCP_PORT,
    TOPOLOGY_TESTS,
    UDP_PORT,
    Topology,
    client_address,
    endpoint_list,
    nodes,
    topology,
)

pytestmark = TOPOLOGY_TESTS
__all__ = ["topology"]  # the fixture, used by name

THREE = ["10.201.16.21", "10.201.16.22", "10.201.16.23"]
SERVICES = f"""\
  - name: web
    type: LoadBalancer
    clusterIP: 10.96.0.10
    externalIPs: ['10.97.0.10']
    loadBalancerIPs: ['10.98.1.10']
    ports:
      - {{name: http, port: 80, targetPort: p, nodePort: 30080}}
      - {{name: dns, port: 53, protocol: UDP, targetPort: dns, nodePort: 30053}}
    endpoints: {endpoint_list(THREE)}
  - name: ranges
    type: LoadBalancer
    clusterIP: 10.96.0.11
    loadBalancerIPs: ['10.98.1.11']
    loadBalancerSourceRanges: ['{CLIENT}/32']
    ports: [{{port: 80, targetPort: p, nodePort: 30081}}]
    endpoints: {endpoint_list(THREE)}
  - name: sticky
    clusterIP: 10.96.0.12
    sessionAffinity: ClientIP
    ports: [{{port: 80, targetPort: p}}]
    endpoints: {endpoint_list(THREE)}
  - name: local
    type: LoadBalancer
    clusterIP: 10.96.0.13
    loadBalancerIPs: ['10.98.1.13']
    externalTrafficPolicy: Local
    proxyProtocol: v1
    ports: [{{port: 80, targetPort: proxy, nodePort: 30082}}]
    endpoints: {endpoint_list(THREE[:2], {THREE[0]: "node-1", THREE[1]: "node-2"})}
"""


def request(proto: str, host: str, port: int, source: str | None = None) -> dict[str, object]:
    return {"proto": proto, "host": host, "port": port, **({"source": source} if source else {})}


def endpoint(reply: str) -> str:
    return reply.split()[0]


async def test_every_service_address_from_another_host(topology: Topology, tmp_path: Path) -> None:
    node_1, node_2 = NODES.values()
    async with nodes(topology, tmp_path, SERVICES):
        places = {  # where: (address, TCP port, UDP port, the node the router sends it to)
            "clusterIP": ("10.96.0.10", 80, 53, node_1),
            "nodePort node-1": (node_1, 30080, 30053, node_1),
            "nodePort node-2": (node_2, 30080, 30053, node_2),
            "loadBalancerIP": ("10.98.1.10", 80, 53, node_1),
            "externalIP": ("10.97.0.10", 80, 53, node_2),
        }
        # One place at a time: a round-robin rotation is per service port, shared by its
        # listeners, so places asked at once would interleave in it.
        for where, (host, tcp_port, udp_port, via) in places.items():
            asked = [request("tcp", host, tcp_port) for _ in range(3)]
            asked += [request("udp", host, udp_port) for _ in range(3)]
            answers = replies(await ask(topology.net, "client", asked))
            tcp, udp = answers[:3], answers[3:]
            # Round-robin over three endpoints; the backend saw the node that proxied.
            assert {endpoint(a) for a in tcp} == {f"{e}:{TCP_PORT}" for e in THREE}, (where, tcp)
            assert {endpoint(a) for a in udp} <= {f"{e}:{UDP_PORT}" for e in THREE}, (where, udp)
            assert all(a.split()[1] == via for a in tcp + udp), (where, tcp + udp)


async def test_semantics_that_judge_the_real_client(topology: Topology, tmp_path: Path) -> None:
    node_1, node_2 = NODES.values()
    async with nodes(topology, tmp_path, SERVICES):
        other = client_address(5)
        # loadBalancerSourceRanges: the client's own address is in, another address of the
        # same host is not (lbd saw each real source: the router does no NAT).
        ranged = [request("tcp", "10.98.1.11", 80, CLIENT), request("tcp", "10.98.1.11", 80, other)]
        got = replies(await ask(topology.net, "client", ranged))
        assert endpoint(got[0]) in {f"{e}:{TCP_PORT}" for e in THREE}
        assert got[1] == "ConnectionResetError"

        # ClientIP affinity, keyed by each real client address: every client keeps one
        # endpoint, and different clients are spread over the endpoints.
        sticky = [
            request("tcp", "10.96.0.12", 80, client_address(i)) for i in range(30) for _ in range(4)
        ]
        chosen = [endpoint(r) for r in replies(await ask(topology.net, "client", sticky))]
        per_client = [set(chosen[i * 4 : i * 4 + 4]) for i in range(30)]
        assert all(len(endpoints) == 1 for endpoints in per_client), per_client
        assert len(Counter(next(iter(e)) for e in per_client)) == 3

        # externalTrafficPolicy: Local: each node sends only to its own endpoint, and the
        # endpoint learns the real client from the PROXY header lbd sends.
        local = [
            request("tcp", node_1, 30082, other),
            request("tcp", node_2, 30082, other),
            request("tcp", "10.98.1.13", 80, CLIENT),  # the router sends it to node-1
        ]
        assert replies(await ask(topology.net, "client", local)) == [
            f"{THREE[0]}:{PROXY_PORT} {node_1} {other}",
            f"{THREE[1]}:{PROXY_PORT} {node_2} {other}",
            f"{THREE[0]}:{PROXY_PORT} {node_1} {CLIENT}",
        ]
