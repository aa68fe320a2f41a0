"""Network programming latency of ``lbd run --kubernetes``: an EndpointSlice change on the API
server → the first connection served by the new endpoint (kube-proxy's SLI, measured from the
outside), for 1, 100 and 1,000 services.

No cluster runs here: the API server is the fake the tests use (tests/kubeapi.py: real list and
watch wire format), in this process; lbd is a real process (``lbd run`` with a ``source:
kubernetes`` file and a kubeconfig), talking to it through kubernetes_asyncio. Every service has
``--endpoints`` endpoints (loopback backends sharing a port, as the pods of a slice do). Each
round moves one random service's slice from backend set A to set B (or back), then connects to
the service every 2 ms until a B (or A) backend answers. Rounds are ``--gap`` apart, longer than
the default minSyncPeriod (1 s), so each change takes the immediate path of the bounded-frequency
runner; a change inside the period would wait for it (by design, as kube-proxy's).

    python benchmarks/k8s_latency.py [--services 1,100,1000] [--rounds 30] [--endpoints 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ (the fake server)

from tests import kubeobjects as k
from tests.kubeapi import FakeApiServer, fake_api_server, kubeconfig
from tests.support import fresh_ip

SERVICE_PORT = 8080
NODE = "node-a"
POLL_S = 0.002


async def start_backends(prefix: str, count: int) -> tuple[list[asyncio.Server], list[str], int]:
    """``count`` servers on fresh 127.x addresses sharing one port; each answers its name."""

    def answer_with(name: bytes):  # type: ignore[no-untyped-def]
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(name)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()

        return answer

    servers, hosts, port = [], [], 0
    for index in range(count):
        host = fresh_ip()
        server = await asyncio.start_server(answer_with(f"{prefix}-{index}\n".encode()), host, port)
        port = server.sockets[0].getsockname()[1]
        servers.append(server)
        hosts.append(host)
    return servers, hosts, port


def endpoints(name: str, hosts: list[str], port: int) -> k.Obj:
    return k.endpoint_slice(f"{name}-1", name, hosts, [{"name": "http", "port": port}])


async def ask(address: str) -> str:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(address, SERVICE_PORT), 1)
    try:
        return (await asyncio.wait_for(reader.readline(), 1)).decode().strip()
    finally:
        writer.close()


async def served_by(address: str, prefix: str, within: float) -> float:
    """Poll until ``prefix`` answers; the time of that answer (perf_counter)."""
    deadline = time.perf_counter() + within
    while time.perf_counter() < deadline:
        with contextlib.suppress(OSError, TimeoutError):
            if (await ask(address)).startswith(prefix):
                return time.perf_counter()
        await asyncio.sleep(POLL_S)
    raise TimeoutError(f"{address} not served by {prefix} within {within}s")


@contextlib.asynccontextmanager
async def lbd(api: FakeApiServer, workdir: Path, extra: list[str]) -> AsyncIterator[Path]:
    config, kube = workdir / "lbd.yaml", workdir / "kubeconfig"
    kube.write_text(kubeconfig(api))
    config.write_text(
        f"apiVersion: lbd/v1\nsource: kubernetes\nnode: {{name: {NODE}}}\n"
        "admin: {enabled: false}\n"
    )
    log = workdir / "lbd.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lbd",
            "run",
            str(config),
            "--kubeconfig",
            str(kube),
            "--log-format",
            "json",
            *extra,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=out,
        )
        try:
            yield log
        finally:
            if process.returncode is None:
                process.terminate()  # our own child, by PID
                try:
                    await asyncio.wait_for(process.wait(), 30)
                except TimeoutError:
                    process.kill()
                    await process.wait()


def log_events(log: Path, name: str) -> list[dict[str, object]]:
    events = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == name:
                events.append(event)
    return events


async def measure(services: int, per_service: int, rounds: int, gap: float, extra: list[str]):  # type: ignore[no-untyped-def]
    a_servers, a_hosts, a_port = await start_backends("a", per_service)
    b_servers, b_hosts, b_port = await start_backends("b", per_service)
    try:
        async with fake_api_server() as api:
            ips = [fresh_ip() for _ in range(services)]
            api.put(k.node(NODE, [fresh_ip()]))
            for index, ip in enumerate(ips):
                name = f"svc-{index}"
                port = {"name": "http", "port": SERVICE_PORT, "targetPort": "http"}
                api.put(k.service(name, ip, [port]), endpoints(name, a_hosts, a_port))
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                async with lbd(api, Path(tmp), extra) as log:
                    await served_by(ips[-1], "a-", 120)
                    ready_s = time.perf_counter() - started
                    on_b: set[int] = set()
                    rng = random.Random(services)
                    latencies = []
                    for _ in range(rounds):
                        await asyncio.sleep(gap)
                        index = rng.randrange(services)
                        to_b = index not in on_b
                        hosts, port = (b_hosts, b_port) if to_b else (a_hosts, a_port)
                        changed = time.perf_counter()
                        api.put(endpoints(f"svc-{index}", hosts, port))
                        served = await served_by(ips[index], "b-" if to_b else "a-", 30)
                        latencies.append(served - changed)
                        on_b ^= {index}
                    applies = [float(e["duration_ms"]) for e in log_events(log, "config reloaded")]
    finally:
        for server in (*a_servers, *b_servers):
            server.close()
    latencies.sort()
    return {
        "services": services,
        "endpoints": services * per_service,
        "rounds": rounds,
        "ready_s": round(ready_s, 2),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000, 1),
        "max_ms": round(latencies[-1] * 1000, 1),
        "apply_p50_ms": round(statistics.median(applies[1:] or applies), 1),
    }


async def main() -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", default="1,100,1000", help="comma-separated counts")
    parser.add_argument("--endpoints", type=int, default=10, help="per service")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--gap", type=float, default=1.2, help="seconds between changes")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args()
    extra = [f"--workers={args.workers}"] if args.workers > 1 else []
    results = []
    for count in (int(n) for n in args.services.split(",")):
        result = await measure(count, args.endpoints, args.rounds, args.gap, extra)
        results.append(result)
        print(json.dumps(result), flush=True)
    print("\n| services | endpoints | p50 | p99 | max | lbd apply (p50) | start to ready |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['services']} | {r['endpoints']} | {r['p50_ms']} ms | {r['p99_ms']} ms | "
            f"{r['max_ms']} ms | {r['apply_p50_ms']} ms | {r['ready_s']} s |"
        )
    if args.json:
        with open(args.json, "w") as out:  # noqa: ASYNC230 - once, after every measurement
            out.write(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    asyncio.run(main())
