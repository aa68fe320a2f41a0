"""Backends the workloads talk to (directly or through a target), pinned with the load generator."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lbdbench.procs import NOFILE, Proc, ensure_free, spawn, wait_tcp_ready
from lbdbench.targets import Address

TOOLS = Path(__file__).resolve().parent.parent / "tools"
DNS_NAME = "svc.bench.test"  # what the DNS workload asks for
DNS_ANSWER = "127.0.9.9"  # never contacted: only an answer


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


@contextmanager
def dns_backend(address: Address, workdir: Path, log_dir: Path, cpus: str | None) -> Iterator[Proc]:
    """dnsmasq answering one name from a hosts file only: it reads no system config, no
    resolv.conf and no /etc/hosts, and never forwards a query anywhere."""
    workdir.mkdir(parents=True, exist_ok=True)
    ensure_free(address.host, address.port, socket.SOCK_DGRAM)
    hosts = workdir / "dns-hosts"
    hosts.write_text(f"{DNS_ANSWER} {DNS_NAME}\n")
    argv = [
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        f"--addn-hosts={hosts}",
        f"--listen-address={address.host}",
        "--bind-interfaces",
        f"--port={address.port}",
        "--pid-file=",
        "--cache-size=0",
    ]
    proc = spawn("backend-dnsmasq", argv, log_dir, cpus)
    try:
        wait_udp_answer(proc, address)
        yield proc
    finally:
        proc.stop()


def wait_udp_answer(proc: Proc, address: Address, timeout: float = 10.0) -> None:
    """Until a query is answered (dnsmasq binds after it started); fail early if it died."""
    query = (
        b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        + b"".join(bytes([len(p)]) + p.encode() for p in DNS_NAME.split("."))
        + b"\x00\x00\x01\x00\x01"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"dnsmasq exited:\n{proc.log_tail()}")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.2)
            try:
                sock.sendto(query, (address.host, address.port))
                if sock.recv(512)[:2] == b"\x00\x01":
                    return
            except OSError:
                pass
        time.sleep(0.1)
    raise RuntimeError(f"dnsmasq did not answer on {address} within {timeout}s")
