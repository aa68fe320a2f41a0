"""lbd on a real interface, as on a node: a network namespace for the node, joined by a veth
pair to a namespace for a client. The addresses (10.200.77.0/24) exist only inside the two
namespaces this test creates and deletes, with no route out of them.

What loopback cannot show: a NodePort on the wildcard address answering a client on another
host over UDP from the address it sent to (IP_PKTINFO, which a connected client requires), and
loadBalancerSourceRanges judging a client that is not 127.x. Root only (CI runs as root).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns import can_make_namespaces, joined_namespaces, output_in, server_in
from tests.procs import lbd_process

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not can_make_namespaces(), reason="needs root and ip (iproute2)"),
]

NODE_IP, CLIENT_IP = "10.200.77.1", "10.200.77.2"
# A second address on the node's interface: a reply to it must not leave from the first one,
# which is what the kernel picks for a wildcard socket unless told (IP_PKTINFO).
NODE_IP_2 = "10.200.77.3"
TCP_PORT, UDP_PORT = 18080, 18081  # the backend, on the node namespace's own loopback

BACKEND = """
import socket, threading
tcp = socket.create_server(("127.0.0.1", {tcp}))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", {udp}))

def serve_udp():
    while True:
        data, peer = udp.recvfrom(65535)
        udp.sendto(b"backend " + data, peer)

threading.Thread(target=serve_udp, daemon=True).start()
print("ready", flush=True)
while True:
    conn, _ = tcp.accept()
    conn.sendall(b"backend\\n")
    conn.close()
"""

CLIENT = """
import socket, sys
def tcp(port, address="{node}"):
    try:
        with socket.create_connection((address, port), timeout=5) as s:
            return s.makefile("rb").readline().decode().strip() or "closed"
    except ConnectionError as error:
        return type(error).__name__
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(5)
udp.connect(("{second}", 30053))  # connected: only a reply from {second}:30053 gets in
udp.send(b"ping")
print("nodeport-tcp", tcp(30080))
print("nodeport-tcp-2", tcp(30080, "{second}"))
print("nodeport-udp", udp.recv(100).decode())
print("lb-allowed", tcp(8443))
print("lb-other-range", tcp(9443))
"""

CONFIG = f"""\
apiVersion: lbd/v1
admin: {{enabled: false}}
node: {{addresses: ['0.0.0.0'], nodePortRange: 30000-32767}}
services:
  - name: web
    type: NodePort
    clusterIP: 127.96.0.10
    ports:
      - {{name: http, port: 80, targetPort: {TCP_PORT}, nodePort: 30080}}
      - {{name: dns, port: 53, protocol: UDP, targetPort: {UDP_PORT}, nodePort: 30053}}
    endpoints: [127.0.0.1]
  - name: allowed
    type: LoadBalancer
    clusterIP: 127.96.0.11
    loadBalancerIPs: ['{NODE_IP}']
    loadBalancerSourceRanges: ['{CLIENT_IP}/32']
    ports: [{{port: 8443, targetPort: {TCP_PORT}, nodePort: 30443}}]
    endpoints: [127.0.0.1]
  - name: elsewhere
    type: LoadBalancer
    clusterIP: 127.96.0.12
    loadBalancerIPs: ['{NODE_IP}']
    loadBalancerSourceRanges: ['10.200.78.0/24']
    ports: [{{port: 9443, targetPort: {TCP_PORT}, nodePort: 30444}}]
    endpoints: [127.0.0.1]
"""


@dataclass(frozen=True)
class Namespaces:
    node: str
    client: str

    def exec(self, namespace: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", namespace, *argv]


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    node_addresses = [f"{NODE_IP}/24", f"{NODE_IP_2}/24"]
    with joined_namespaces(("n", "c"), (node_addresses, [f"{CLIENT_IP}/24"])) as (node, client):
        yield Namespaces(node, client)


async def test_nodeport_and_source_ranges_on_a_real_interface(
    namespaces: Namespaces, tmp_path: Path
) -> None:
    backend_code = BACKEND.format(tcp=TCP_PORT, udp=UDP_PORT)
    async with server_in(namespaces.node, backend_code):
        config = tmp_path / "lbd.yaml"
        config.write_text(CONFIG)
        async with lbd_process(config, wrapper=namespaces.exec(namespaces.node)) as lbd:
            await lbd.wait_event("lbd started", timeout=20)
            client_code = CLIENT.format(node=NODE_IP, second=NODE_IP_2)
            assert await output_in(namespaces.client, client_code) == [
                "nodeport-tcp backend",
                "nodeport-tcp-2 backend",
                "nodeport-udp backend ping",  # from NODE_IP_2:30053, or the socket drops it
                "lb-allowed backend",
                "lb-other-range ConnectionResetError",  # outside the ranges: reset
            ]
            lbd.signal()
            assert await lbd.wait_exit() == 0
