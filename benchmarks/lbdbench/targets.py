"""Targets: what sits between the load generator and the backend (nothing, lbd, HAProxy, nginx).

A target is started once per sample, on its own listen address, in front of one backend
address, and stopped (by PID) afterwards. Adding a variant (e.g. "lbd 2 workers") is one line in
`all_targets()`.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lbdbench.procs import (
    NOFILE,
    Proc,
    ensure_free,
    max_proxied_connections,
    spawn,
    wait_log_line,
    wait_tcp_ready,
    wait_udp_ready,
)

Transport = Literal["tcp", "udp"]
Kind = Literal["direct", "lbd", "reference"]
LISTEN_PORT = 8080
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Route:
    """What a workload asks a target to carry: one transport to one backend address."""

    transport: Transport
    backend: Address
    replies: int | None = None  # UDP: a session ends after this many replies (None: on idle)


@dataclass
class Running:
    """A started target: where clients connect, and the process to measure (None for direct)."""

    address: Address
    proc: Proc | None
    problems: list[str] = field(default_factory=list)


class Target(ABC):
    """One proxy configuration. `cpus` is the taskset list for the proxy process."""

    def __init__(
        self, key: str, label: str, kind: Kind, listen_host: str, workers: int, cpus: str | None
    ) -> None:
        self.key = key
        self.label = label
        self.kind = kind
        self.listen = Address(listen_host, LISTEN_PORT)
        self.workers = workers
        self.cpus = cpus

    transports: frozenset[Transport] = frozenset({"tcp", "udp"})
    # Exit codes that mean "stopped as asked" after SIGTERM (HAProxy dies by the signal: -15).
    clean_exits: frozenset[int] = frozenset({0, -15})

    def supports(self, transport: Transport) -> bool:
        return transport in self.transports

    @abstractmethod
    def command(self, route: Route, workdir: Path) -> list[str]:
        """Write the config into workdir and return the foreground command line."""

    @contextmanager
    def run(
        self, route: Route, workdir: Path, log_dir: Path, colocate: str | None = None
    ) -> Iterator[Running]:
        """Start, wait until ready, yield, stop. `colocate`: pin a single-process target there
        instead (the latency workload keeps everything on one CPU: cross-CPU wake-ups on a
        virtual machine cost more than the proxy itself)."""
        workdir.mkdir(parents=True, exist_ok=True)
        kind = socket.SOCK_STREAM if route.transport == "tcp" else socket.SOCK_DGRAM
        ensure_free(self.listen.host, self.listen.port, kind)
        cpus = colocate if colocate and self.cpus else self.cpus
        proc = spawn(self.key, self.command(route, workdir), log_dir, cpus=cpus)
        running = Running(self.listen, proc)
        try:
            self.wait_ready(proc, route)
            yield running
        finally:
            was_alive = proc.alive()
            code = proc.stop()
            if not was_alive:
                running.problems.append(f"{self.label} exited on its own with code {code}")
            elif code not in self.clean_exits:
                running.problems.append(f"{self.label} exited with code {code} after SIGTERM")

    def wait_ready(self, proc: Proc, route: Route) -> None:
        if route.transport == "tcp":
            wait_tcp_ready(proc, self.listen.host, self.listen.port)
        else:
            wait_udp_ready(proc, self.listen.host, self.listen.port)


class Direct(Target):
    """No balancer: the client talks to the backend. The baseline every ratio is taken against."""

    def __init__(self) -> None:
        super().__init__("direct", "direct", "direct", "", 0, None)

    def command(self, route: Route, workdir: Path) -> list[str]:
        raise NotImplementedError("direct has no process")

    @contextmanager
    def run(
        self, route: Route, workdir: Path, log_dir: Path, colocate: str | None = None
    ) -> Iterator[Running]:
        yield Running(route.backend, None)


class Lbd(Target):
    # UDP services: `protocol: UDP` in the port (see command()).
    transports: frozenset[Transport] = frozenset({"tcp", "udp"})
    clean_exits: frozenset[int] = frozenset({0})  # the contract: SIGTERM → drain → exit 0

    def __init__(
        self,
        listen_host: str,
        workers: int,
        cpus: str | None,
        loop: str = "uvloop",
        launcher: tuple[str, ...] = ("lbd",),
        version: str = "",
    ) -> None:
        """``version``: a git revision this lbd was taken from, when it is not the working
        tree's (``run.py --compare-with``): its key ends in ``-base`` and its label names it."""
        key = "lbd" if workers == 1 else f"lbd-w{workers}"
        if loop != "uvloop":
            key += f"-{loop}"
        label = f"lbd {workers} worker{'s' if workers > 1 else ''}"
        if version:
            key, label = f"{key}-base", f"{label} @{version}"
        super().__init__(
            key,
            label + ("" if loop == "uvloop" else f" ({loop})"),
            "lbd",
            listen_host,
            workers,
            cpus,
        )
        self.loop = loop
        self.launcher = launcher

    def command(self, route: Route, workdir: Path) -> list[str]:
        protocol = "" if route.transport == "tcp" else ", protocol: UDP"
        replies = "" if route.replies is None else f"\n    udpResponses: {route.replies}"
        config = f"""\
apiVersion: lbd/v1
node: {{addresses: [127.0.0.5]}}
defaults: {{strategy: round-robin, connectTimeout: 1s, idleTimeout: 1h, drainTimeout: 5s,
           accessLog: false}}
services:
  - name: bench
    clusterIP: {self.listen.host}
    ports: [{{port: {self.listen.port}, targetPort: {route.backend.port}{protocol}}}]
    endpoints: [{route.backend.host}]{replies}
"""
        path = workdir / f"{self.key}.yaml"
        path.write_text(config)
        argv = [*self.launcher, "run", str(path), "--log-format", "json", "--loop", self.loop]
        if self.workers > 1:
            argv += ["--workers", str(self.workers)]
        return argv

    def wait_ready(self, proc: Proc, route: Route) -> None:
        """With workers the supervisor's socket accepts (into its backlog) before any worker
        serves, so a probe connection would sit there and reach the backend right before the
        benchmark's own (iperf3's server then refuses the real client as busy). Wait for lbd to
        say it has started, then probe as for every target."""
        wait_log_line(proc, '"event": "lbd started"')
        super().wait_ready(proc, route)


class HAProxy(Target):
    transports: frozenset[Transport] = frozenset({"tcp"})  # HAProxy (community) has no UDP proxy

    def __init__(
        self, listen_host: str, threads: int, cpus: str | None, buffer_kib: int | None = None
    ) -> None:
        key = "haproxy" if threads == 1 else f"haproxy-t{threads}"
        label = f"HAProxy nbthread {threads}"
        if buffer_kib:
            key, label = f"{key}-buf{buffer_kib}k", f"{label} buf {buffer_kib}k"
        super().__init__(key, label, "reference", listen_host, threads, cpus)
        self.buffer_kib = buffer_kib

    def command(self, route: Route, workdir: Path) -> list[str]:
        config = f"""\
global
    nbthread {self.workers}
    maxconn {max_proxied_connections(100)}
{f"    tune.bufsize {self.buffer_kib * 1024}" if self.buffer_kib else ""}

defaults
    mode tcp
    timeout connect 1s
    timeout client 1h
    timeout server 1h

frontend bench
    bind {self.listen}
    default_backend bench

backend bench
    server endpoint1 {route.backend}
"""
        path = workdir / f"{self.key}.cfg"
        path.write_text(config)
        return ["haproxy", "-db", "-f", str(path)]


class Nginx(Target):
    def __init__(
        self, listen_host: str, workers: int, cpus: str | None, buffer_kib: int | None = None
    ) -> None:
        key = "nginx" if workers == 1 else f"nginx-w{workers}"
        label = f"nginx stream {workers} worker{'s' if workers > 1 else ''}"
        if buffer_kib:
            key, label = f"{key}-buf{buffer_kib}k", f"{label} buf {buffer_kib}k"
        super().__init__(key, label, "reference", listen_host, workers, cpus)
        self.buffer_kib = buffer_kib

    def command(self, route: Route, workdir: Path) -> list[str]:
        udp = " udp" if route.transport == "udp" else " backlog=4096"
        reuseport = " reuseport" if self.workers > 1 else ""
        timeout = "10s" if route.transport == "udp" else "1h"
        config = f"""\
load_module {NGINX_STREAM_MODULE};
worker_processes {self.workers};
worker_rlimit_nofile {NOFILE};
daemon off;
pid {workdir / self.key}.pid;
error_log {workdir / self.key}-error.log warn;
events {{ worker_connections 40000; }}
stream {{
    server {{
        listen {self.listen}{udp}{reuseport};
        proxy_pass {route.backend};
        proxy_connect_timeout 1s;
        proxy_timeout {timeout};
{f"        proxy_responses {route.replies};" if route.replies is not None else ""}
{f"        proxy_buffer_size {self.buffer_kib}k;" if self.buffer_kib else ""}
    }}
}}
"""
        path = workdir / f"{self.key}.conf"
        path.write_text(config)
        error_log = f"{workdir / self.key}-error.log"
        return ["nginx", "-p", str(workdir), "-c", str(path), "-e", error_log]


def lbd_snapshot(dest: Path) -> tuple[tuple[str, ...], str]:
    """Copy the importable lbd package to dest and return (a command that runs the copy, where
    it came from). lbd is often edited while a run goes on (an editable install): the copy keeps
    one version of it for the whole run. Falls back to the `lbd` script when there is no package.
    """
    spec = importlib.util.find_spec("lbd")
    if spec is None or spec.origin is None:
        return (shutil.which("lbd") or "lbd",), "the lbd script on PATH"
    source = Path(spec.origin).parent
    shutil.copytree(
        source, dest / "lbd", ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True
    )
    # env execs python, so the PID we signal is lbd's; -P keeps the working directory (maybe a
    # checkout with the live package) off sys.path, so only the copy can be imported.
    launcher = ("env", f"PYTHONPATH={dest}", sys.executable, "-P", "-m", "lbd")
    return launcher, f"a copy of {source} taken at the start of the run"


def lbd_at_revision(revision: str, dest: Path) -> tuple[str, ...]:
    """Export lbd's package as it was at git ``revision`` to dest; a command that runs it (for
    before/after rows of a change in one run, under the same noise)."""
    repo = Path(__file__).resolve().parents[2]
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", revision, "lbd"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=60)
    return ("env", f"PYTHONPATH={dest}", sys.executable, "-P", "-m", "lbd")


def lbd_status(launcher: tuple[str, ...]) -> tuple[bool, bool, str]:
    """(lbd runs, lbd accepts --workers, a reason when it does not run)."""
    try:
        result = subprocess.run(
            [*launcher, "run", "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, False, str(exc)
    if result.returncode != 0:
        return False, False, (result.stderr or result.stdout).strip().splitlines()[-1:][0]
    return True, "--workers" in result.stdout, ""


def all_targets(
    proxy_cpus: str,
    multi_cpus: str | None,
    workers: int,
    include_lbd: bool,
    lbd_workers: bool,
    loops: tuple[str, ...] = ("uvloop",),
    buffer_kib: int | None = 64,
    launcher: tuple[str, ...] = ("lbd",),
    base: tuple[str, tuple[str, ...]] | None = None,
) -> list[Target]:
    """Every target of a run, in report order. Single-process proxies get `proxy_cpus`.

    The references get `buffer_kib` buffers (HAProxy tune.bufsize, nginx proxy_buffer_size):
    their 16 KiB defaults cost them 15-30 % of bulk throughput here and nothing elsewhere, and
    lbd reads up to 256 KiB at a time, so the larger buffers are the fairer comparison.
    """
    targets: list[Target] = [Direct()]
    if include_lbd:
        for i, loop in enumerate(loops):
            targets.append(Lbd(f"127.96.0.{10 + i}", 1, proxy_cpus, loop, launcher))
        if base is not None:
            revision, base_launcher = base
            targets.append(Lbd("127.96.0.15", 1, proxy_cpus, "uvloop", base_launcher, revision))
    targets += [
        HAProxy("127.96.0.20", 1, proxy_cpus, buffer_kib),
        Nginx("127.96.0.30", 1, proxy_cpus, buffer_kib),
    ]
    if workers > 1:
        if include_lbd and lbd_workers:
            targets.append(Lbd("127.96.1.10", workers, multi_cpus, "uvloop", launcher))
        targets.append(HAProxy("127.96.1.20", workers, multi_cpus, buffer_kib))
        targets.append(Nginx("127.96.1.30", workers, multi_cpus, buffer_kib))
    return targets
