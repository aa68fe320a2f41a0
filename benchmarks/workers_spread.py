"""How evenly lbd's workers share new connections, and what 2 workers move against 1.

- Spread: lbd with 2 workers in front of a backend that accepts and holds connections; each
  round opens 8 connections at once, and ``ss`` says which worker process accepted each
  (rounds are bounded: ``--rounds``, 20 by default).
- Bulk: ``iperf3 -P 8`` through lbd with 1 and with 2 workers, in turns (``--repeats``).

    python benchmarks/workers_spread.py [--source DIR ...] [--rounds 20] [--repeats 3]

Every source tree (default: this one) is run in turns. Traffic stays on 127.x; every process
started here is stopped by its PID.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lbdbench.procs import free_port, wait_listening

HOST = "127.79.0.1"
BACKEND = "127.79.0.2"
REPO = Path(__file__).resolve().parent.parent
HOLDER = """
import socket, sys, time
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen(4096)
held = []
deadline = time.monotonic() + float(sys.argv[3])
server.settimeout(1.0)
while time.monotonic() < deadline:
    try:
        held.append(server.accept()[0])
    except TimeoutError:
        pass
    held = [s for s in held if s.fileno() >= 0][-2000:]
"""


def start_lbd(source: Path, work: Path, backend_port: int, workers: int) -> tuple[object, int]:
    port = free_port(HOST)
    config = work / f"lbd-{port}.yaml"
    config.write_text(
        f"apiVersion: lbd/v1\nworkers: {workers}\nadmin: {{enabled: false}}\nservices:\n"
        f"  - name: s\n    clusterIP: {HOST}\n"
        f"    ports: [{{port: {port}, targetPort: {backend_port}}}]\n"
        f"    endpoints: [{{address: {BACKEND}}}]\n"
    )
    argv = [sys.executable, "-m", "lbd", "run", str(config), "--no-watch", "--log-level=warning"]
    proc = subprocess.Popen(argv, cwd=source)
    wait_listening(HOST, port)
    time.sleep(1.0)  # every worker serving
    return proc, port


def accepted_by(port: int) -> collections.Counter[int]:
    """Established client-side sockets of lbd on ``port``, by the pid that holds them."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return collections.Counter(int(pid) for pid in re.findall(r"pid=(\d+)", out))


def spread(port: int, rounds: int) -> list[tuple[int, int]]:
    result = []
    for _ in range(rounds):
        socks = []
        for _ in range(8):  # at once: non-blocking connects, then wait for all
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex((HOST, port))
            socks.append(sock)
        deadline = time.monotonic() + 5
        counts: collections.Counter[int] = collections.Counter()
        while time.monotonic() < deadline:
            counts = accepted_by(port)
            if sum(counts.values()) >= 8:
                break
            time.sleep(0.05)
        shares = [*sorted(counts.values(), reverse=True), 0, 0]
        result.append((shares[0], shares[1]))
        for sock in socks:
            sock.close()
        time.sleep(0.2)
    return result


def bulk(port: int, seconds: int = 3) -> float:
    out = subprocess.run(
        ["iperf3", "-c", HOST, "-p", str(port), "-P", "8", "-t", str(seconds), "--json"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def stop(proc: object) -> None:
    """SIGTERM (ours, by PID); a second one ends the drain of the held connections at once."""
    assert isinstance(proc, subprocess.Popen)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(2)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", type=Path, action="append")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sources = args.source or [REPO]
    work = Path(tempfile.mkdtemp(prefix="lbd-spread-"))
    holder_port = free_port(BACKEND)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, BACKEND, str(holder_port), "600"])
    iperf_port = free_port(BACKEND)
    iperf = subprocess.Popen(
        ["iperf3", "-s", "-B", BACKEND, "-p", str(iperf_port)], stdout=subprocess.DEVNULL
    )
    try:
        wait_listening(BACKEND, holder_port)
        wait_listening(BACKEND, iperf_port)
        for source in sources:
            proc, port = start_lbd(source, work, holder_port, 2)
            try:
                rounds = spread(port, args.rounds)
            finally:
                stop(proc)
            tally = collections.Counter(f"{a}/{b}" for a, b in rounds)
            print(
                f"{source}: 8 connections at once over 2 workers, {args.rounds} rounds: "
                f"{dict(tally.most_common())}",
                flush=True,
            )
        rates: dict[tuple[Path, int], list[float]] = collections.defaultdict(list)
        for _ in range(args.repeats):
            for source in sources:
                for workers in (1, 2):
                    proc, port = start_lbd(source, work, iperf_port, workers)
                    try:
                        rates[(source, workers)].append(bulk(port))
                    finally:
                        stop(proc)
                    time.sleep(0.5)  # iperf3 serves one test at a time
        for source in sources:
            one = statistics.median(rates[(source, 1)])
            two = statistics.median(rates[(source, 2)])
            print(
                f"{source}: bulk 8 streams, 1 worker {one:.2f} Gbit/s, 2 workers {two:.2f} "
                f"Gbit/s ({two / one:.2f}x); samples {rates[(source, 1)]} / "
                f"{rates[(source, 2)]}",
                flush=True,
            )
    finally:
        for p in (holder, iperf):
            p.send_signal(signal.SIGTERM)  # ours, by PID
            p.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
