"""New connections per second and proxy CPU per connection: lbd with 1 and N workers, and the
two ways N workers can share a listener (one socket bound once, or one SO_REUSEPORT socket per
worker). wrk (Connection: close, so every request is a new proxied connection) is pinned with
taskset; the backend is nginx answering ``return 200``. Traffic stays on 127.x.

    python benchmarks/workers_conn_rate.py [--repeats 3] [--duration 4] [--wrk-cpus 1]

Variants run interleaved (one sample of each per repeat); medians are printed.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lbdbench.procs import free_port, start_ok_backend, wait_listening

HOST = "127.77.0.1"
BACKEND = "127.77.0.2"
REPO = Path(__file__).resolve().parent.parent

# Runs lbd's supervisor with a chosen socket mode (not a user-facing option: this benchmark is
# what chose the default).
LAUNCH = """
import asyncio, sys
from lbd.config import load_text
from lbd.net.loops import LOOP_FACTORIES
from lbd.observability.logging import configure_logging
from lbd.process.supervisor import Supervisor
from lbd.process.supervisor_admin import serve_supervised
path, mode, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = open(path, "rb").read()
configure_logging("json", "warning")
async def main():
    sup = Supervisor(load_text(data, path), (path, data), workers=workers,
                     worker_args=["--log-level=warning"], socket_mode=mode)
    return await serve_supervised(sup, watch=False)
with asyncio.Runner(loop_factory=LOOP_FACTORIES["uvloop"]) as r:
    sys.exit(r.run(main()))
"""


def tree_cpu(pid: int) -> float:
    pids, seen = [pid], []
    while pids:
        p = pids.pop()
        seen.append(p)
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        pids += [int(c) for c in children]
    ticks = 0
    for p in seen:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def wrk(url: str, duration: float, cpus: str) -> float:
    out = subprocess.run(
        [
            "taskset",
            "-c",
            cpus,
            "wrk",
            "-t1",
            "-c32",
            f"-d{int(duration)}s",
            "-H",
            "Connection: close",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=True,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if errors:
        print(f"    wrk socket errors: {errors.group(1)}", file=sys.stderr)
    return float(match.group(1)) if match else 0.0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--wrk-cpus", default="1", help="taskset list for wrk")
    parser.add_argument("--lbd-cpus", default="0", help="taskset list for 1-worker lbd")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lbd-bench-"))
    nginx, backend_port = start_ok_backend(work, BACKEND, args.wrk_cpus)
    variants: dict[str, list[tuple[float, float]]] = {}
    try:
        lbd_port = free_port(HOST)
        config = work / "lbd.yaml"
        config.write_text(
            "apiVersion: lbd/v1\nadmin: {enabled: false}\nservices:\n"
            f"  - name: web\n    clusterIP: {HOST}\n"
            f"    ports: [{{port: {lbd_port}, targetPort: {backend_port}}}]\n"
            f"    endpoints: [{{address: {BACKEND}}}]\n"
        )
        n = args.workers
        commands = {
            "direct (nginx)": None,
            "lbd 1 worker": [
                "taskset",
                "-c",
                args.lbd_cpus,
                sys.executable,
                "-m",
                "lbd",
                "run",
                str(config),
                "--no-watch",
                "--log-level=warning",
            ],
            f"lbd {n} workers, shared socket": [
                sys.executable,
                "-c",
                LAUNCH,
                str(config),
                "shared",
                str(n),
            ],
            f"lbd {n} workers, SO_REUSEPORT": [
                sys.executable,
                "-c",
                LAUNCH,
                str(config),
                "reuseport",
                str(n),
            ],
        }
        for repeat in range(args.repeats):
            for name, argv in commands.items():
                proc = None
                if argv is not None:
                    proc = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.DEVNULL)
                    wait_listening(HOST, lbd_port)
                    time.sleep(1.0)  # every worker up
                url = (
                    f"http://{BACKEND}:{backend_port}/"
                    if proc is None
                    else f"http://{HOST}:{lbd_port}/"
                )
                cpu_before = tree_cpu(proc.pid) if proc else 0.0
                rate = wrk(url, args.duration, args.wrk_cpus)
                cpu = tree_cpu(proc.pid) - cpu_before if proc else 0.0
                us = cpu / (rate * args.duration) * 1e6 if rate and proc else 0.0
                variants.setdefault(name, []).append((rate, us))
                print(f"repeat {repeat + 1} {name}: {rate:,.0f} conn/s, {us:.0f} us CPU/conn")
                if proc is not None:
                    proc.send_signal(signal.SIGTERM)  # ours, by PID
                    proc.wait(30)
    finally:
        nginx.send_signal(signal.SIGQUIT)  # ours, by PID
        nginx.wait(30)
    print("\n| variant | new connections/s (median) | proxy CPU per connection |")
    print("|---|---|---|")
    for name, samples in variants.items():
        rate = statistics.median(r for r, _ in samples)
        us = statistics.median(u for _, u in samples)
        print(f"| {name} | {rate:,.0f} | {f'{us:.0f} us' if us else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
