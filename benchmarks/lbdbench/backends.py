"""Backends the workloads talk to (directly or through a target), pinned with the load generator."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lbdbench.procs import NOFILE, Proc, ensure_free, spawn, wait_tcp_ready
from lbdbench.targets import Address

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def tool(name: str) -> list[str]:
    """Command line prefix for a helper script in benchmarks/tools/."""
    return [sys.executable, str(TOOLS / name)]


@contextmanager
def running(proc: Proc, address: Address) -> Iterator[Proc]:
    try:
        wait_tcp_ready(proc, address.host, address.port)
        yield proc
    finally:
        proc.stop()


@contextmanager
def http_backend(
    address: Address, workdir: Path, log_dir: Path, cpus: str | None
) -> Iterator[Proc]:
    """nginx, one worker, answering every request with a tiny fixed 200 response."""
    workdir.mkdir(parents=True, exist_ok=True)
    ensure_free(address.host, address.port)
    config = f"""\
worker_processes 1;
worker_rlimit_nofile {NOFILE};
daemon off;
pid {workdir}/backend-nginx.pid;
error_log {workdir}/backend-nginx-error.log warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 60s;
    server {{
        listen {address} backlog=4096;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""
    path = workdir / "backend-nginx.conf"
    path.write_text(config)
    argv = [
        "nginx",
        "-p",
        str(workdir),
        "-c",
        str(path),
        "-e",
        f"{workdir}/backend-nginx-error.log",
    ]
    with running(spawn("backend-nginx", argv, log_dir, cpus), address) as proc:
        yield proc


@contextmanager
def iperf3_server(address: Address, log_dir: Path, cpus: str | None) -> Iterator[Proc]:
    ensure_free(address.host, address.port)
    argv = ["iperf3", "--server", "--bind", address.host, "--port", str(address.port)]
    with running(spawn("backend-iperf3", argv, log_dir, cpus), address) as proc:
        yield proc


@contextmanager
def idle_backend(address: Address, log_dir: Path, cpus: str | None) -> Iterator[Proc]:
    ensure_free(address.host, address.port)
    argv = [*tool("idleconns.py"), "serve", address.host, str(address.port), "--max-time", "3600"]
    with running(spawn("backend-idle", argv, log_dir, cpus), address) as proc:
        yield proc
