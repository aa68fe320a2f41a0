#!/usr/bin/env python3
"""lbd on a node, over veth: throughput and connection rate with the client and the backend on
other hosts (network namespaces), against HAProxy and nginx stream in the same place.

    client (10.203.0.2) ── veth ── node (10.203.0.1 | 10.203.1.1) ── veth ── backend (10.203.1.2)

The proxy under test runs in the node namespace and listens on 10.203.0.1:8080; ``direct`` is
the node's kernel forwarding the client's packets to the backend (no proxy). Load generator and
backend share CPU 0, the proxy has CPU 1 (as benchmarks/run.py pins them). Workloads: iperf3
with 1 and 8 streams (bits/s), wrk with ``Connection: close`` (new connections/s). Reported as
the existing suite reports: medians, and lbd / direct and lbd / best reference ratios.

    sudo python benchmarks/netns_bench.py [--repeats 3] [--duration 3]

Root only. The namespaces are named ``lbb<pid>-*`` and deleted at the end, with every process
started in them (stopped by PID first); nothing is added to the root namespace, and the traffic
stays between these three namespaces. Writes results/netns-latest.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lbdbench.backends import tool
from lbdbench.procs import (
    Proc,
    cpu_busy,
    cpu_seconds,
    pinned,
    raise_own_nofile,
    spawn,
    wait_log_line,
)
from lbdbench.report import MetricInfo, Sample, TargetInfo, build_rows, markdown, write_json
from lbdbench.targets import (
    Address,
    HAProxy,
    Lbd,
    Nginx,
    Route,
    Target,
    lbd_snapshot,
    lbd_status,
)
from lbdbench.workloads import MeasureError, run_json
from run import lbd_dirty, machine, pinning, versions

HERE = Path(__file__).resolve().parent
CLIENT, NODE_FRONT, NODE_BACK, BACKEND = "10.203.0.2", "10.203.0.1", "10.203.1.1", "10.203.1.2"
IPERF, HTTP = Address(BACKEND, 9001), Address(BACKEND, 9000)
METRICS = [
    MetricInfo("bulk-1", "gbps", "bulk throughput over veth, 1 stream", "Gbit/s", True, 1e-9, ""),
    MetricInfo("bulk-8", "gbps", "bulk throughput over veth, 8 streams", "Gbit/s", True, 1e-9, ""),
    MetricInfo("conn-rate", "rate", "new connections/s over veth", "conn/s", True, 1.0, ""),
    MetricInfo("conn-rate", "cpu_us", "proxy CPU per connection", "µs", False, 1.0, ""),
]
DESCRIBE = {
    "bulk-1": "iperf3 -P 1 from the client host, bits/s received by the backend host",
    "bulk-8": "iperf3 -P 8 from the client host, bits/s received by the backend host",
    "conn-rate": "wrk -t1 -c32 with `Connection: close` from the client host to nginx "
    "(`return 200`) on the backend host: completed requests/s, one connection each",
}


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=10)


class Hosts:
    """The three namespaces; ``inside(host, argv)`` is argv run there (same PID)."""

    def __init__(self) -> None:
        self.tag = f"lbb{os.getpid()}"
        self.made: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def inside(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def build(self) -> None:
        for host in ("client", "node", "backend"):
            ip("netns", "add", self.ns(host))
            self.made.append(self.ns(host))
            ip("-n", self.ns(host), "link", "set", "lo", "up")
        for index, (a, b, a_ip, b_ip) in enumerate(
            [("client", "node", CLIENT, NODE_FRONT), ("node", "backend", NODE_BACK, BACKEND)]
        ):
            end_a, end_b = f"{self.tag}{index}a", f"{self.tag}{index}b"
            ip("link", "add", end_a, "type", "veth", "peer", "name", end_b)
            ip("link", "set", end_a, "netns", self.ns(a))  # out of the root namespace at once
            ip("link", "set", end_b, "netns", self.ns(b))
            for host, end, address in ((a, end_a, a_ip), (b, end_b, b_ip)):
                ip("-n", self.ns(host), "addr", "add", f"{address}/24", "dev", end)
                ip("-n", self.ns(host), "link", "set", end, "up")
        ip("-n", self.ns("client"), "route", "add", "default", "via", NODE_FRONT)
        ip("-n", self.ns("backend"), "route", "add", "default", "via", NODE_BACK)
        # Thousands of short connections a second leave TIME_WAIT sockets behind; the kernel
        # reuses their ports only for loopback by default (tcp_tw_reuse=2), and these hosts
        # talk over veth. As on a real proxy node, let new connections reuse them (these
        # namespaces only), or the rate collapses to a few hundred per second once the
        # ephemeral ports run out.
        tuning = {
            "net.ipv4.tcp_tw_reuse": "1",
            "net.ipv4.ip_local_port_range": "1024 65535",
        }
        for host in ("client", "node", "backend"):
            for key, value in tuning.items():
                sysctl = ["sysctl", "-q", "-w", f"{key}={value}"]
                subprocess.run(self.inside(host, sysctl), check=True)
        sysctl = ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]
        subprocess.run(self.inside("node", sysctl), check=True)

    def remove(self) -> None:
        for namespace in self.made:
            pids = subprocess.run(
                ["ip", "netns", "pids", namespace], capture_output=True, text=True
            ).stdout.split()
            for pid in pids:  # only what this script started in its own namespaces
                subprocess.run(["kill", "-KILL", pid], capture_output=True)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def wait_listening(hosts: Hosts, host: str, proc: Proc, port: int, timeout: float = 15) -> None:
    """Until a TCP socket listens on ``port`` inside ``host`` (no probe connection: it would
    reach the backend through the proxy, and iperf3's server takes one client at a time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise MeasureError(f"{proc.name} exited:\n{proc.log_tail()}")
        listing = subprocess.run(
            hosts.inside(host, ["ss", "-Hltn", f"sport = :{port}"]), capture_output=True, text=True
        ).stdout
        if listing.strip():
            return
        time.sleep(0.05)
    raise MeasureError(f"{proc.name} did not listen on port {port} within {timeout}s")


@contextlib.contextmanager
def started(proc: Proc) -> Iterator[Proc]:
    try:
        yield proc
    finally:
        proc.stop()


@contextlib.contextmanager
def backends(hosts: Hosts, work: Path, logs: Path, cpus: str | None) -> Iterator[None]:
    config = work / "backend-nginx.conf"
    config.write_text(
        f"worker_processes 1; daemon off; pid {work}/backend.pid; error_log {work}/b.log;\n"
        "events { worker_connections 20000; }\n"
        f"http {{ access_log off; server {{ listen {HTTP} backlog=4096;\n"
        '  location / { return 200 "ok\\n"; } } }\n'
    )
    nginx = spawn(
        "backend-nginx", hosts.inside("backend", ["nginx", "-c", str(config)]), logs, cpus
    )
    iperf = ["iperf3", "--server", "--bind", IPERF.host, "--port", str(IPERF.port)]
    iperf3 = spawn("backend-iperf3", hosts.inside("backend", iperf), logs, cpus)
    with started(nginx), started(iperf3):
        wait_listening(hosts, "backend", nginx, HTTP.port)
        wait_listening(hosts, "backend", iperf3, IPERF.port)
        yield


def measure(
    hosts: Hosts, workload: str, address: Address, proc: Proc | None, args: Any
) -> dict[str, float]:
    """One sample of ``workload`` against ``address``, load generated in the client host."""

    def client(argv: list[str]) -> list[str]:
        return pinned(hosts.inside("client", argv), args.load_cpus)

    seconds = str(max(1, round(args.duration)))
    cpu_before = cpu_seconds(proc.pid) if proc else 0.0
    if workload.startswith("bulk"):
        time.sleep(0.3)  # iperf3's server: done with the previous client
        streams = workload.split("-")[1]
        argv = ["iperf3", "-c", address.host, "-p", str(address.port), "-t", seconds]
        result = run_json(client([*argv, "-P", streams, "--json"]), 60)
        if "error" in result:
            raise MeasureError(f"iperf3: {result['error']}")
        return {"gbps": float(result["end"]["sum_received"]["bits_per_second"])}
    argv = ["wrk", "-t1", "-c32", f"-d{seconds}s", "--timeout", "2s"]
    argv += ["--script", str(tool("wrk_json.lua")[1]), "-H", "Connection: close"]
    result = run_json(client([*argv, f"http://{address}/"]), 60)
    requests = int(result["requests"])
    if requests == 0:
        raise MeasureError(f"wrk: no requests: {result}")
    values = {"rate": requests / (result["duration_us"] / 1e6)}
    if proc is not None:
        values["cpu_us"] = (cpu_seconds(proc.pid) - cpu_before) / requests * 1e6
    return values


def run_target(
    hosts: Hosts, target: Target | None, workload: str, args: Any, work: Path, logs: Path
) -> dict[str, float]:
    backend = HTTP if workload == "conn-rate" else IPERF
    if target is None:
        return measure(hosts, workload, backend, None, args)
    argv = hosts.inside("node", target.command(Route("tcp", backend), work))
    proc = spawn(target.key, argv, logs / workload, cpus=target.cpus)
    with started(proc):
        if target.kind == "lbd":
            wait_log_line(proc, '"event": "lbd started"')
        wait_listening(hosts, "node", proc, target.listen.port)
        return measure(hosts, workload, target.listen, proc, args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--output", type=Path, default=HERE / "results")
    parser.add_argument("--workloads", default="bulk-1,bulk-8,conn-rate")
    args = parser.parse_args()
    raise_own_nofile()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work, logs = args.output / "work" / f"netns-{stamp}", args.output / "logs" / f"netns-{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    args.load_cpus, proxy_cpus, pin_text = pinning()
    launcher, source = lbd_snapshot(work / "lbd-snapshot")
    runnable, _, reason = lbd_status(launcher)
    if not runnable:
        print(f"lbd does not run: {reason}")
        return 2
    targets: list[Target] = [
        Lbd(NODE_FRONT, 1, proxy_cpus, "uvloop", launcher),
        HAProxy(NODE_FRONT, 1, proxy_cpus, 64),
        Nginx(NODE_FRONT, 1, proxy_cpus, 64),
    ]
    infos = [TargetInfo("direct", "direct (kernel forwarding)", "direct", 0, None)]
    infos += [TargetInfo(t.key, t.label, t.kind, t.workers, t.cpus) for t in targets]
    samples: list[Sample] = []
    busy_before = cpu_busy()
    hosts = Hosts()
    try:
        hosts.build()
        with backends(hosts, work, logs, args.load_cpus):
            for workload in args.workloads.split(","):
                for repeat in range(args.repeats):
                    order: list[Target | None] = [None, *targets]
                    shift = repeat % len(order)
                    for target in order[shift:] + order[:shift]:
                        key = target.key if target else "direct"
                        try:
                            values = run_target(hosts, target, workload, args, work, logs)
                            error = None
                        except (MeasureError, OSError, KeyError) as exc:
                            values, error = {}, f"{type(exc).__name__}: {exc}"
                        print(f"[{workload} r{repeat}] {key:<16} {values or error}", flush=True)
                        for metric in (m for m in METRICS if m.workload == workload):
                            if metric.key in values or error:
                                value = values.get(metric.key)
                                samples.append(
                                    Sample(workload, metric.key, key, repeat, value, {}, error)
                                )
    finally:
        hosts.remove()
        shutil.rmtree(work, ignore_errors=True)
    metrics = [
        MetricInfo(
            m.workload, m.key, m.title, m.unit, m.higher_is_better, m.scale, DESCRIBE[m.workload]
        )
        for m in METRICS
    ]
    rows = build_rows(samples, metrics, infos)
    meta: dict[str, Any] = {
        "started": stamp,
        "mode": "netns (client, node, backend over veth)",
        "repeats": args.repeats,
        "duration": args.duration,
        "pinning": pin_text,
        "machine": machine(),
        "versions": versions(True),
        "lbd_source": source + lbd_dirty(),
        "cpu_busy_before_pct": busy_before,  # others' load: the numbers are disturbed if > 0
        "cpu_busy_after_pct": cpu_busy(),
    }
    text = markdown(rows, infos, meta)
    (args.output / "netns-latest.md").write_text(text)
    write_json(args.output / "netns-latest.json", samples, rows, infos, meta)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
