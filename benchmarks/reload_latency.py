"""Reload latency: config file written → the new endpoint receiving traffic, with 1,000 services.

lbd runs as a real process (``lbd run``, file watcher on). Every service points at backend A;
each round rewrites the file so that one service (in the middle of the file) points at the
other backend, then connects to that service every few milliseconds until the answer comes
from the new backend. Also reports lbd's own validate+apply time from its "config reloaded"
log line. Everything runs on 127.x addresses. Target (issue 3): median under 500 ms.

    python benchmarks/reload_latency.py [--services 1000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

SERVICE_PORT = 8080
POLL_S = 0.002
ROUND_TIMEOUT_S = 10.0


def cluster_ip(index: int) -> str:
    return f"127.150.{index // 250}.{index % 250 + 1}"


def render(services: int, target: int, backend_ports: tuple[int, int], use_second: bool) -> str:
    lines = [
        "apiVersion: lbd/v1",
        "admin: {enabled: false}",
        "defaults: {drainTimeout: 1s}",
        "services:",
    ]
    for index in range(services):
        second = use_second and index == target
        address = "127.151.0.2" if second else "127.151.0.1"
        port = backend_ports[1] if second else backend_ports[0]
        lines.append(
            f"  - {{name: svc-{index}, clusterIP: {cluster_ip(index)}, "
            f"ports: [{{port: {SERVICE_PORT}, targetPort: {port}}}], endpoints: [{address}]}}"
        )
    return "\n".join(lines) + "\n"


async def start_backend(name: bytes, address: str) -> asyncio.Server:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(name)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, address, 0)


async def ask(address: str) -> bytes:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(address, SERVICE_PORT), 1)
    except (OSError, TimeoutError):
        return b""
    try:
        return await asyncio.wait_for(reader.read(16), 1)
    except (OSError, TimeoutError):
        return b""
    finally:
        writer.close()


async def read_log(
    stream: asyncio.StreamReader, applied: list[float], started: asyncio.Event
) -> None:
    while line := await stream.readline():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "lbd started":
            started.set()
        elif event.get("event") == "config reloaded":
            applied.append(float(event["duration_ms"]))


async def main(services: int, rounds: int) -> dict[str, object]:
    a = await start_backend(b"A", "127.151.0.1")
    b = await start_backend(b"B", "127.151.0.2")
    ports = (a.sockets[0].getsockname()[1], b.sockets[0].getsockname()[1])
    target = services // 2
    workdir = Path(tempfile.mkdtemp(prefix="lbd-reload-"))
    path = workdir / "lbd.yaml"
    path.write_text(render(services, target, ports, use_second=False))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lbd",
        "run",
        str(path),
        "--log-format",
        "json",
        "--log-level",
        "info",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    applied: list[float] = []
    started = asyncio.Event()
    reader = asyncio.create_task(read_log(process.stderr, applied, started))
    latencies: list[float] = []
    try:
        await asyncio.wait_for(started.wait(), 60)
        await asyncio.sleep(0.5)  # let the watcher settle
        address = cluster_ip(target)
        assert await ask(address) == b"A"
        for round_ in range(rounds):
            use_second = round_ % 2 == 0
            want = b"B" if use_second else b"A"
            text = render(services, target, ports, use_second)
            begun = time.perf_counter()
            path.write_text(text)
            while await ask(address) != want:
                if time.perf_counter() - begun > ROUND_TIMEOUT_S:
                    raise RuntimeError(f"round {round_}: no switch within {ROUND_TIMEOUT_S}s")
                await asyncio.sleep(POLL_S)
            latencies.append((time.perf_counter() - begun) * 1000)
            await asyncio.sleep(0.3)  # a separate burst for the watcher
    finally:
        process.terminate()  # our own child, by PID
        await asyncio.wait_for(process.wait(), 30)
        await reader
        a.close()
        b.close()
    return {
        "services": services,
        "rounds": rounds,
        "latency_ms_median": round(statistics.median(latencies), 1),
        "latency_ms_min": round(min(latencies), 1),
        "latency_ms_max": round(max(latencies), 1),
        "apply_ms_median": round(statistics.median(applied), 1) if applied else None,
        "target_ms": 500,
        "config_bytes": path.stat().st_size if path.exists() else None,
        "cpu_count": os.cpu_count(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    result = asyncio.run(main(args.services, args.rounds))
    print(json.dumps(result, indent=2))
