"""Reload latency and the event-loop stall it causes, with 1,000 (or 10,000) services.

lbd runs as a real process (``lbd run``, file watcher on). Every service points at the same
endpoints but one (in the middle of the file), which has a single endpoint; each round rewrites
the file so that this endpoint is swapped for another backend, then connects to that service
every few milliseconds until the answer comes from the new backend: the time from the write to
that answer is the reload latency. Meanwhile a prober connects to an unrelated service back to
back; the longest of its round trips during a reload, against the longest outside reloads, is
how long the reload stalled everyone else's connections (issue 12: at most 20 ms). Also reports
lbd's own reload time from its "config reloaded" log line. Everything runs on 127.x addresses.

    python benchmarks/reload_latency.py [--services 1000] [--endpoints 10] [--rounds 10]
    python benchmarks/reload_latency.py --revision 127e8fc   # lbd as it was at a git revision
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVICE_PORT = 8080
POLL_S = 0.002
PROBE_GAP_S = 0.001
ROUND_TIMEOUT_S = 60.0
REPO = Path(__file__).resolve().parent.parent


def cluster_ip(index: int) -> str:
    return f"127.150.{index // 250}.{index % 250 + 1}"


def render(
    services: int, target: int, endpoints: list[tuple[str, int]], other: tuple[str, int], swap: bool
) -> str:
    lines = [
        "apiVersion: lbd/v1",
        "admin: {enabled: false}",
        "defaults: {drainTimeout: 1s}",
        "services:",
    ]
    for index in range(services):
        # The target has one endpoint, swapped between two backends, so that one answer tells
        # which config runs (with ten, nine would still answer "A" after the swap).
        chosen = endpoints
        if index == target:
            chosen = [other] if swap else endpoints[:1]
        listed = ", ".join(f"{{address: {a}, ports: {{p: {p}}}}}" for a, p in chosen)
        lines.append(
            f"  - {{name: svc-{index}, clusterIP: {cluster_ip(index)}, "
            f"ports: [{{port: {SERVICE_PORT}, targetPort: p}}], endpoints: [{listed}]}}"
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
        reader, writer = await asyncio.wait_for(asyncio.open_connection(address, SERVICE_PORT), 5)
    except (OSError, TimeoutError):
        return b""
    try:
        return await asyncio.wait_for(reader.read(16), 5)
    except (OSError, TimeoutError):
        return b""
    finally:
        writer.close()


async def probe(address: str, samples: list[tuple[float, float]], stop: asyncio.Event) -> None:
    """(start, round trip in s) of back-to-back connections to an unrelated service."""
    while not stop.is_set():
        began = time.perf_counter()
        await ask(address)
        samples.append((began, time.perf_counter() - began))
        await asyncio.sleep(PROBE_GAP_S)


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


def launcher(revision: str | None, workdir: Path) -> list[str]:
    """``python -m lbd`` of this checkout, or of lbd's package as it was at ``revision``."""
    if revision is None:
        return [sys.executable, "-m", "lbd"]
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, "lbd"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(workdir)], input=archive, check=True)
    return ["env", f"PYTHONPATH={workdir}", sys.executable, "-P", "-m", "lbd"]


async def main(
    services: int, endpoints: int, rounds: int, revision: str | None
) -> dict[str, object]:
    servers = [await start_backend(b"A", f"127.151.1.{i + 1}") for i in range(endpoints)]
    other_server = await start_backend(b"B", "127.151.0.2")
    listed = [(f"127.151.1.{i + 1}", s.sockets[0].getsockname()[1]) for i, s in enumerate(servers)]
    other = ("127.151.0.2", other_server.sockets[0].getsockname()[1])
    target = services // 2
    workdir = Path(tempfile.mkdtemp(prefix="lbd-reload-"))
    path = workdir / "lbd.yaml"
    path.write_text(render(services, target, listed, other, swap=False))
    process = await asyncio.create_subprocess_exec(
        *launcher(revision, workdir),
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
    windows: list[tuple[float, float]] = []
    samples: list[tuple[float, float]] = []
    stop = asyncio.Event()
    prober: asyncio.Task[None] | None = None
    try:
        await asyncio.wait_for(started.wait(), 300)
        await asyncio.sleep(0.5)  # the old lbd has no "watching" signal: let its watcher start
        address = cluster_ip(target)
        assert await ask(address) == b"A"
        prober = asyncio.create_task(probe(cluster_ip(0), samples, stop))
        await asyncio.sleep(1.0)  # a baseline of the probe outside any reload
        for round_ in range(rounds):
            swap = round_ % 2 == 0
            want = b"B" if swap else b"A"
            text = render(services, target, listed, other, swap)
            begun = time.perf_counter()
            path.write_text(text)
            while await ask(address) != want:
                if time.perf_counter() - begun > ROUND_TIMEOUT_S:
                    raise RuntimeError(f"round {round_}: no switch within {ROUND_TIMEOUT_S}s")
                await asyncio.sleep(POLL_S)
            done = time.perf_counter()
            latencies.append((done - begun) * 1000)
            windows.append((begun, done + 0.2))
            await asyncio.sleep(1.0)  # a separate burst for the watcher, and probe baseline
    finally:
        stop.set()
        if prober is not None:
            await prober
        process.terminate()  # our own child, by PID
        await asyncio.wait_for(process.wait(), 60)
        await reader
        for server in (*servers, other_server):
            server.close()
    during = [rtt for t, rtt in samples if any(a <= t <= b for a, b in windows)]
    outside = [rtt for t, rtt in samples if not any(a - 0.2 <= t <= b for a, b in windows)]
    return {
        "lbd": revision or "this checkout",
        "services": services,
        "endpoints_per_service": endpoints,
        "rounds": rounds,
        "latency_ms_median": round(statistics.median(latencies), 1),
        "latency_ms_max": round(max(latencies), 1),
        "apply_ms_median": round(statistics.median(applied), 1) if applied else None,
        "stall_ms_max_during_reload": round(max(during) * 1000, 1) if during else None,
        "probe_ms_max_outside_reload": round(max(outside) * 1000, 1) if outside else None,
        "probe_ms_p50": round(statistics.median(rtt for _, rtt in samples) * 1000, 2),
        "probes": len(samples),
        "config_bytes": path.stat().st_size if path.exists() else None,
        "cpu_count": os.cpu_count(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--revision", help="run lbd as it was at this git revision")
    args = parser.parse_args()
    result = asyncio.run(main(args.services, args.endpoints, args.rounds, args.revision))
    print(json.dumps(result, indent=2))
