"""``lbd demo``: lbd with its own backends on 127.x, nothing to set up by hand.

Three demo backends answer HTTP (``curl``) and lines (``nc``), each with a different think
time so that least-connection has something to show. One ClusterIP service per strategy and a
NodePort service sit in front of them; the demo drives connections through each strategy,
prints where they went, and stays up for a person to try.
"""

from __future__ import annotations

import asyncio
import functools
import re
import sys
from collections import Counter
from dataclasses import dataclass

from lbd.config import load_text
from lbd.process.worker import ShutdownState, serve
from lbd.runtime.runtime import Runtime

_HTTP_REQUEST = re.compile(rb"^[A-Z]+ \S+ HTTP/1\.[01]\r?\n$")
_ANSWER = re.compile(rb"hello from (backend-\d)")
DRIVE_CONCURRENCY = 16
STRATEGY_SERVICES = {
    "random": "127.96.0.1",
    "round-robin": "127.96.0.2",
    "least-connection": "127.96.0.3",
}
NODEPORT_CLUSTER_IP = "127.96.0.4"
NODE_ADDRESS = "127.0.0.5"
SERVICE_PORT = 8080
NODE_PORT = 30080
ADMIN = "127.96.0.9:9180"


@dataclass(frozen=True)
class DemoBackend:
    name: str
    address: str
    weight: int
    think_time: float  # seconds before each answer


BACKENDS = (
    DemoBackend("backend-1", "127.0.10.1", 1, 0.002),
    DemoBackend("backend-2", "127.0.10.2", 1, 0.006),
    DemoBackend("backend-3", "127.0.10.3", 2, 0.020),
)


async def _serve_client(
    backend: DemoBackend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        line = await asyncio.wait_for(reader.readline(), 60)
        if _HTTP_REQUEST.match(line):
            while (header := await asyncio.wait_for(reader.readline(), 10)) not in (
                b"\r\n",
                b"\n",
                b"",
            ):
                del header
            await asyncio.sleep(backend.think_time)
            body = f"hello from {backend.name} ({backend.address})\n".encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
        else:
            while line:
                await asyncio.sleep(backend.think_time)
                writer.write(f"{backend.name}: ".encode() + line)
                await writer.drain()
                line = await asyncio.wait_for(reader.readline(), 60)
        await writer.drain()
    except (ConnectionError, TimeoutError, asyncio.IncompleteReadError, ValueError):
        pass  # a demo client that went away or sent garbage: nothing to do but close
    finally:
        writer.close()


async def start_backends() -> tuple[list[asyncio.Server], dict[str, int]]:
    servers: list[asyncio.Server] = []
    ports: dict[str, int] = {}
    for backend in BACKENDS:
        server = await asyncio.start_server(
            functools.partial(_serve_client, backend), backend.address, 0
        )
        servers.append(server)
        ports[backend.name] = server.sockets[0].getsockname()[1]
    return servers, ports


def demo_config(ports: dict[str, int]) -> str:
    endpoints = "\n".join(
        f"      - {{address: {b.address}, ports: {{http: {ports[b.name]}}}, weight: {b.weight}}}"
        for b in BACKENDS
    )
    services = []
    for strategy, cluster_ip in STRATEGY_SERVICES.items():
        services.append(
            f"  - name: demo-{strategy}\n    clusterIP: {cluster_ip}\n    strategy: {strategy}\n"
            f"    ports: [{{name: http, port: {SERVICE_PORT}, targetPort: http}}]\n"
            f"    endpoints:\n{endpoints}\n"
        )
    services.append(
        f"  - name: demo-nodeport\n    type: NodePort\n    clusterIP: {NODEPORT_CLUSTER_IP}\n"
        f"    ports: [{{name: http, port: {SERVICE_PORT}, targetPort: http, "
        f"nodePort: {NODE_PORT}}}]\n"
        f"    endpoints:\n{endpoints}\n"
    )
    return (
        "apiVersion: lbd/v1\n"
        f"node: {{name: demo-node, addresses: [{NODE_ADDRESS}]}}\n"
        f"admin: {{address: '{ADMIN}'}}\n"
        "defaults: {connectTimeout: 1s, idleTimeout: 5m, drainTimeout: 2s}\n"
        "services:\n" + "".join(services)
    )


async def _one_request(address: str, port: int) -> str:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), 5)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    match = _ANSWER.search(answer)
    return match.group(1).decode() if match else "error"


async def drive(address: str, port: int, connections: int) -> Counter[str]:
    """``connections`` requests, DRIVE_CONCURRENCY at a time; where each one was answered."""
    counts: Counter[str] = Counter()
    remaining = iter(range(connections))

    async def client() -> None:
        for _ in remaining:
            try:
                counts[await _one_request(address, port)] += 1
            except (OSError, TimeoutError):
                counts["error"] += 1

    await asyncio.gather(*(client() for _ in range(DRIVE_CONCURRENCY)))
    return counts


def distribution_table(results: dict[str, Counter[str]]) -> str:
    names = [b.name for b in BACKENDS] + (
        ["error"] if any(r["error"] for r in results.values()) else []
    )
    header = f"{'strategy':<18}" + "".join(f"{n:>16}" for n in names)
    weights = f"{'(weight)':<18}" + "".join(f"{b.weight:>16}" for b in BACKENDS)
    think = f"{'(think time)':<18}" + "".join(f"{b.think_time * 1000:>14g}ms" for b in BACKENDS)
    rows = [header, weights, think]
    for strategy, counts in results.items():
        total = sum(counts.values()) or 1
        cells = "".join(f"{counts[n]:>7} ({100 * counts[n] / total:4.1f}%)" for n in names)
        rows.append(f"{strategy:<18}{cells}")
    return "\n".join(rows)


async def run_demo(connections: int, once: bool) -> int:
    servers, ports = await start_backends()
    state = ShutdownState()
    config = load_text(demo_config(ports), "<demo>")

    async def show(runtime: Runtime) -> None:
        results = {}
        for strategy, cluster_ip in STRATEGY_SERVICES.items():
            results[strategy] = await drive(cluster_ip, SERVICE_PORT, connections)
        results["NodePort (rr)"] = await drive(NODE_ADDRESS, NODE_PORT, connections)
        print(f"\n{connections} connections per strategy, {DRIVE_CONCURRENCY} at a time:\n")
        print(distribution_table(results))
        print("\nlbd demo is up. Try:")
        for strategy, cluster_ip in STRATEGY_SERVICES.items():
            print(f"  curl http://{cluster_ip}:{SERVICE_PORT}/      # ClusterIP, {strategy}")
        print(f"  curl http://{NODE_ADDRESS}:{NODE_PORT}/      # NodePort")
        print(f"  nc {STRATEGY_SERVICES['round-robin']} {SERVICE_PORT}               # type lines")
        print(f"  lbd status --admin {ADMIN} --watch        # endpoints, connections, rates")
        print(f"  curl http://{ADMIN}/metrics          # Prometheus metrics")
        print("Ctrl+C to stop." if not once else "")
        sys.stdout.flush()
        if once:
            state.should_exit.set()

    try:
        return await serve(config, ready=show, state=state)
    finally:
        for server in servers:
            server.close()
