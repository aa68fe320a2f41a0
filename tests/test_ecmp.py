"""Two lbd nodes behind one router that spreads a LoadBalancer IP over both (ECMP, hashing on
layer 4 as MetalLB's BGP mode or a cloud load balancer does): cross-node ClientIP affinity
without shared state, which kube-proxy cannot offer (tests/topology.py).

Measured from the client host, with hundreds of client addresses and several connections each
(different source ports, so the router sends a client's connections to both nodes):
- the share of clients that land on the same endpoint through either node (goal >= 99 %);
- the share of clients that move when one of 5 endpoints is removed (maglev goal <= 1/5 + 2
  points; source-hash for comparison: most clients move);
- a node failure: its lbd is killed, the router's nexthop to it withdrawn (the test plays
  MetalLB's part); new connections that failed in between, and whether every client is still
  on its endpoint afterwards.
The numbers are printed (``pytest -s``) as well as checked.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests import topology as lan
from tests.netlab import HERE, ask
from tests.topology import TOPOLOGY_TESTS, Node, Topology, topology

pytestmark = TOPOLOGY_TESTS
__all__ = ["topology"]  # the fixture, used by name

CLIENT_COUNT = 400
PER_CLIENT = 4  # connections per client: all on one node only 1 time in 8
NODE_OF = {address: name for name, address in lan.NODES.items()}


def services(strategy: str, endpoints: list[str]) -> str:
    return f"""\
  - name: ecmp
    type: LoadBalancer
    clusterIP: 10.96.1.10
    loadBalancerIPs: ['{lan.ECMP_IP}']
    strategy: {strategy}
    ports: [{{port: 80, targetPort: p, nodePort: 30090}}]
    endpoints: {lan.endpoint_list(endpoints)}
"""


async def landings(topology: Topology, per_client: int) -> dict[str, list[tuple[str, str]]]:
    """Per client address: (node, endpoint) of each of its connections to the ECMP IP."""
    asked = [
        {"proto": "tcp", "host": lan.ECMP_IP, "port": 80, "source": lan.client_address(i)}
        for i in range(CLIENT_COUNT)
        for _ in range(per_client)
    ]
    results = await ask(topology.net, "client", asked, concurrency=64)
    seen: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for request, result in zip(asked, results, strict=True):
        reply = result.get("reply")
        assert reply is not None, result
        where, node_address = reply.split()[:2]
        seen[str(request["source"])].append((NODE_OF[node_address], where))
    return seen


def same_endpoint_share(seen: dict[str, list[tuple[str, str]]]) -> tuple[float, int]:
    """Of the clients whose connections reached both nodes: the share that saw one endpoint."""
    both = [hits for hits in seen.values() if len({node for node, _ in hits}) == 2]
    same = sum(1 for hits in both if len({where for _, where in hits}) == 1)
    return same / len(both), len(both)


async def reload_all(started: list[Node], text: str) -> None:
    for node in started:
        node.path.write_text(node.path.read_text().split("services:\n")[0] + "services:\n" + text)
        count = sum(1 for e in node.lbd.events if e.get("event") == "config reloaded")
        node.lbd.signal(signal.SIGHUP)
        await node.lbd.wait_event("config reloaded", timeout=20, count=count + 1)


@pytest.mark.parametrize("strategy", ["maglev", "source-hash", "round-robin"])
async def test_same_endpoint_through_either_node(
    topology: Topology, tmp_path: Path, strategy: str
) -> None:
    five = lan.ENDPOINTS[:5]
    async with lan.nodes(topology, tmp_path, services(strategy, five)) as started:
        before = await landings(topology, PER_CLIENT)
        share, both = same_endpoint_share(before)
        await reload_all(started, services(strategy, [e for e in five if e != five[2]]))
        after = await landings(topology, 1)
        moved = sum(before[c][0][1] != after[c][0][1] for c in before) / len(before)
        print(
            f"\n[ecmp] {strategy}: {share:.1%} of {both} clients that reached both nodes "
            f"stayed on one endpoint; removing 1 of 5 endpoints moved {moved:.1%} of "
            f"{len(before)} clients"
        )
        if strategy == "maglev":
            assert share >= 0.99 and moved <= 1 / 5 + 0.02
        elif strategy == "source-hash":
            assert share >= 0.99 and moved > 0.5  # the modulus changed under most clients
        else:
            assert share < 0.9  # round-robin: per node, per connection


async def test_a_node_fails_and_maglev_keeps_every_client(
    topology: Topology, tmp_path: Path
) -> None:
    try:
        async with lan.nodes(topology, tmp_path, services("maglev", lan.ENDPOINTS[:5])) as started:
            await node_failure(topology, started)
    finally:
        topology.route_ecmp(*lan.NODES)  # for the next test


async def node_failure(topology: Topology, started: list[Node]) -> None:
    before = await landings(topology, 2)
    # New connections arrive every 5 ms from rotating clients. After 200 results node-1's lbd
    # dies; 100 results (about half a second) later the router's route to it is withdrawn, as
    # MetalLB would once it noticed.
    load = [
        {"proto": "tcp", "host": lan.ECMP_IP, "port": 80, "source": lan.client_address(i % 200)}
        for i in range(800)
    ]
    spec = {"requests": load, "interval": 0.005, "timeout": 1.0}
    client = await asyncio.create_subprocess_exec(
        *topology.net.exec("client", sys.executable, str(HERE / "netclient.py")),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    results: list[dict[str, Any]] = []
    killed_at = withdrawn_at = 0.0
    try:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(json.dumps(spec).encode())
        client.stdin.close()
        while line := await asyncio.wait_for(client.stdout.readline(), 20):
            results.append(json.loads(line))
            if len(results) == 200:
                started[0].lbd.process.kill()  # ours, by PID
                await started[0].lbd.process.wait()
                killed_at = max(r["t"] for r in results)
            elif len(results) == 300:
                topology.route_ecmp("node-2")
                withdrawn_at = max(r["t"] for r in results)
        assert await client.wait() == 0
    finally:
        if client.returncode is None:
            client.kill()  # ours, by PID
            await client.wait()
    failed = [r for r in results if "error" in r]
    print(
        f"\n[ecmp] node failure: {len(failed)} of {len(results)} new connections failed "
        f"({Counter(r['error'] for r in failed)}); lbd killed at t={killed_at:.2f}s, route "
        f"withdrawn at t={withdrawn_at:.2f}s; failures started between "
        f"t={min((r['t'] for r in failed), default=0):.2f}s and "
        f"t={max((r['t'] for r in failed), default=0):.2f}s"
    )
    assert len(results) == len(load)
    assert failed and all(killed_at - 0.1 <= r["t"] <= withdrawn_at + 0.1 for r in failed)
    after = await landings(topology, 2)
    kept = sum({where for _, where in after[c]} == {before[c][0][1]} for c in before)
    print(f"[ecmp] after the failure, {kept} of {len(before)} clients are on their endpoint")
    assert kept == len(before)
    assert all(node == "node-2" for hits in after.values() for node, _ in hits)
