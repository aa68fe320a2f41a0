#!/usr/bin/env python3
"""64-byte UDP request/response datagrams per second: direct vs lbd vs nginx stream (UDP).

    python benchmarks/udp_rate.py [--flows 16] [--duration 3] [--repeats 3] [--loop uvloop]

Every process is started here and stopped by its PID; traffic stays on 127.78.0.0/24.
An echo backend (its own process) answers each datagram; the load generator keeps one request
in flight on each of ``--flows`` connected client sockets (each one proxy session) and counts
answered requests. Each target gets the same backend, load and duration; the median of
``--repeats`` samples is reported with the ratio to direct and to nginx. nginx runs one worker
(``apt-get install nginx libnginx-mod-stream``); it is skipped when not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BACKEND = ("127.78.0.1", 5300)
LBD = ("127.78.0.2", 5300)
NGINX = ("127.78.0.3", 5300)
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
PAYLOAD = b"x" * 64

ECHO = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
sock.bind((sys.argv[1], int(sys.argv[2])))
recv, send = sock.recvfrom, sock.sendto
while True:
    data, peer = recv(65536)
    send(data, peer)
"""


def load(target: tuple[str, int], flows: int, duration: float) -> float:
    """Answered requests per second, one request in flight per flow."""
    socks = []
    poller = select.epoll()
    try:
        for _ in range(flows):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(target)
            socks.append(sock)
            poller.register(sock.fileno(), select.EPOLLIN)
        by_fd = {sock.fileno(): sock for sock in socks}
        for sock in socks:
            sock.send(PAYLOAD)
        answered = 0
        start = time.monotonic()
        end = start + duration
        while (now := time.monotonic()) < end:
            for fd, _ in poller.poll(0.2):
                sock = by_fd[fd]
                try:
                    sock.recv(2048)
                except OSError:
                    continue  # a refused or lost request: resend below
                answered += 1
                sock.send(PAYLOAD)
        return answered / (now - start)
    finally:
        poller.close()
        for sock in socks:
            sock.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc; clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(target: tuple[str, int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(target)
        sock.settimeout(0.2)
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                sock.send(b"ready?")
                if sock.recv(2048) == b"ready?":
                    return
            time.sleep(0.05)
    raise RuntimeError(f"{target} did not answer within {timeout}s")


@contextlib.contextmanager
def process(args: list[str], cwd: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def lbd_config(workdir: Path) -> Path:
    path = workdir / "lbd.yaml"
    path.write_text(
        "apiVersion: lbd/v1\n"
        "services:\n"
        "  - name: echo\n"
        f"    clusterIP: {LBD[0]}\n"
        f"    ports: [{{port: {LBD[1]}, protocol: UDP, targetPort: {BACKEND[1]}}}]\n"
        f"    endpoints: [{BACKEND[0]}]\n"
    )
    return path


def nginx_config(workdir: Path) -> Path:
    path = workdir / "nginx.conf"
    path.write_text(
        f"load_module {NGINX_STREAM_MODULE};\n"
        "worker_processes 1;\n"
        "daemon off;\n"
        # One process doing the work (no master), so its CPU time is what /proc shows.
        "master_process off;\n"
        f"pid {workdir}/nginx.pid;\n"
        f"error_log {workdir}/nginx-error.log warn;\n"
        "events { worker_connections 4096; }\n"
        "stream {\n"
        f"  upstream echo {{ server {BACKEND[0]}:{BACKEND[1]}; }}\n"
        f"  server {{ listen {NGINX[0]}:{NGINX[1]} udp; proxy_pass echo; proxy_timeout 30s; }}\n"
        "}\n"
    )
    return path


def measure(args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Requests/s, and the proxy's CPU microseconds per request, per target."""
    results: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="lbd-udp-bench-") as tmp:
        workdir = Path(tmp)
        targets: dict[str, tuple[list[str], tuple[str, int], Path | None]] = {
            "direct": ([], BACKEND, None),
            "lbd": (
                [
                    sys.executable,
                    "-m",
                    "lbd",
                    "run",
                    str(lbd_config(workdir)),
                    "--loop",
                    args.loop,
                    "--log-level",
                    "warning",
                ],
                LBD,
                REPO,
            ),
        }
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if os.path.exists(nginx) and os.path.exists(NGINX_STREAM_MODULE):
            conf = nginx_config(workdir)
            targets["nginx"] = (
                [nginx, "-c", str(conf), "-p", str(workdir), "-e", "stderr"],
                NGINX,
                None,
            )
        else:
            print("nginx or its stream module is not installed: skipping nginx", file=sys.stderr)
        with process([sys.executable, "-c", ECHO, BACKEND[0], str(BACKEND[1])]):
            wait_ready(BACKEND)
            for _ in range(args.repeats):
                for name, (command, address, cwd) in targets.items():
                    with contextlib.ExitStack() as stack:
                        proc = stack.enter_context(process(command, cwd)) if command else None
                        wait_ready(address)
                        load(address, args.flows, 0.3)  # warm-up: sessions exist, caches warm
                        before = cpu_seconds(proc.pid) if proc else 0.0
                        start = time.monotonic()
                        rate = load(address, args.flows, args.duration)
                        used = cpu_seconds(proc.pid) - before if proc else 0.0
                        requests = rate * (time.monotonic() - start)
                    results.setdefault(name, []).append(rate)
                    note = ""
                    if proc:
                        cpu.setdefault(name, []).append(used / requests * 1e6)
                        note = f", {cpu[name][-1]:5.1f} us CPU/request"
                    print(f"{name:>7}: {rate:10.0f} req/s{note}", file=sys.stderr)
    return results, cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flows", type=int, default=16, help="client sockets (sessions)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per sample")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    args = parser.parse_args()
    results, cpu = measure(args)
    medians = {name: statistics.median(rates) for name, rates in results.items()}
    summary: dict[str, object] = {
        "workload": f"64-byte UDP request/response, {args.flows} flows, one in flight each",
        "req_per_s_median": {k: round(v) for k, v in medians.items()},
        "samples": {k: [round(r) for r in v] for k, v in results.items()},
        # Less sensitive to other load on the machine than the rate: the proxy's own cost.
        "proxy_cpu_us_per_request_median": {
            k: round(statistics.median(v), 2) for k, v in cpu.items()
        },
        "lbd_vs_direct": round(medians["lbd"] / medians["direct"], 3),
    }
    if "nginx" in medians:
        summary["lbd_vs_nginx"] = round(medians["lbd"] / medians["nginx"], 3)
        summary["nginx_vs_direct"] = round(medians["nginx"] / medians["direct"], 3)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
