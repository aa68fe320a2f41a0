"""The workloads. Each measures one or more metrics of one target per sample.

A workload starts its backend once; the harness then starts each target in front of it, calls
`measure()` with the target's address, and stops the target.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbdbench.backends import (
    DNS_NAME,
    dns_backend,
    http_backend,
    idle_backend,
    iperf3_server,
    tool,
)
from lbdbench.procs import cpu_seconds, ensure_free, pinned, rss_bytes, spawn
from lbdbench.targets import Address, Route, Running, Transport

BACKEND_HOST = "127.0.2.1"


@dataclass(frozen=True)
class Settings:
    """Knobs of one run; `quick` shortens everything."""

    duration: float  # seconds of load per throughput sample
    load_cpus: str | None  # load generator and backends (taskset list)
    workdir: Path
    log_dir: Path
    http_connections: int = 32
    idle_connections: int = 10000
    latency_rate: float = 1000.0
    latency_count: int = 3000
    udp_flows: int = 4
    dns_queries: int = 2000


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str
    higher_is_better: bool
    scale: float = 1.0  # multiply the raw value for display in `unit`


@dataclass
class Measurement:
    values: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)


class MeasureError(RuntimeError):
    pass


def run_json(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run a load generator to completion and parse the last JSON object line of its stdout."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise MeasureError(f"{argv[0]} timed out after {timeout}s") from exc
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        detail = (result.stderr or result.stdout).strip()[-500:]
        raise MeasureError(f"{' '.join(argv)} failed ({result.returncode}): {detail}")
    try:
        parsed: dict[str, Any] = json.loads(result.stdout)  # one document (iperf3 --json)
    except json.JSONDecodeError:
        parsed = json.loads(lines[-1])  # or a JSON line after other output (wrk)
    return parsed


class Workload(ABC):
    key: str
    title: str
    transport: Transport = "tcp"
    needs_proxy: bool = False  # True: the metric is about the proxy process (no direct row)
    colocate: bool = False  # True: pin the proxy on the load generator's CPU too
    metrics: tuple[Metric, ...]
    backend_address: Address

    @abstractmethod
    def describe(self, s: Settings) -> str:
        """One line: what the client does and what is counted."""

    @abstractmethod
    def backend(self, s: Settings) -> AbstractContextManager[object]: ...

    @abstractmethod
    def measure(self, s: Settings, target: Running, sample: int) -> Measurement: ...

    @property
    def route(self) -> Route:
        return Route(self.transport, self.backend_address)


class Bulk(Workload):
    """iperf3 client → target → iperf3 server; the data-path throughput of the proxy."""

    def __init__(self, streams: int) -> None:
        self.streams = streams
        self.key = f"bulk-{streams}"
        streams_text = f"{streams} stream{'s' if streams > 1 else ''}"
        self.title = f"bulk TCP, {streams_text}"
        self.metrics = (
            Metric("gbps", f"bulk throughput, {streams_text}", "Gbit/s", True, 1e-9),
            Metric("cpu_s_per_gib", f"proxy CPU per GiB, {streams_text}", "ms", False, 1e3),
        )
        self.backend_address = Address(BACKEND_HOST, 9001)

    def describe(self, s: Settings) -> str:
        return f"iperf3 -P {self.streams}, client → server, bits/s received by the server"

    def backend(self, s: Settings) -> AbstractContextManager[object]:
        return iperf3_server(self.backend_address, s.log_dir, s.load_cpus)

    def measure(self, s: Settings, target: Running, sample: int) -> Measurement:
        seconds = max(1, round(s.duration))
        argv = pinned(
            [
                "iperf3",
                "--client",
                target.address.host,
                "--port",
                str(target.address.port),
                "--time",
                str(seconds),
                "--parallel",
                str(self.streams),
                "--json",
            ],
            s.load_cpus,
        )
        # The readiness probe reached the iperf3 server through the proxy too; iperf3 serves one
        # control connection at a time, so wait until the probe's upstream side is gone.
        wait_until_closed(self.backend_address)
        cpu_before = cpu_seconds(target.proc.pid) if target.proc else 0.0
        result = run_json(argv, seconds + 30)
        cpu = cpu_seconds(target.proc.pid) - cpu_before if target.proc else None
        if "error" in result:
            raise MeasureError(f"iperf3: {result['error']}")
        received = result["end"]["sum_received"]
        values = {"gbps": float(received["bits_per_second"])}
        if cpu is not None and received["bytes"]:  # the proxy's CPU time per GiB moved
            values["cpu_s_per_gib"] = cpu / (received["bytes"] / 2**30)
        return Measurement(values, {"retransmits": result["end"]["sum_sent"].get("retransmits")})


class Http(Workload):
    """wrk → target → nginx returning a 3-byte body. With `close`, one request per connection."""

    def __init__(self, close: bool) -> None:
        self.close = close
        self.backend_address = Address(BACKEND_HOST, 9000)
        if close:
            self.key, self.title = "conn-rate", "new connections/s"
            self.metrics = (
                Metric("rate", "new connections/s (HTTP, Connection: close)", "conn/s", True),
                Metric("cpu_us", "proxy CPU per connection", "µs", False),
            )
        else:
            self.key, self.title = "keepalive", "keep-alive requests/s"
            self.metrics = (
                Metric("rate", "keep-alive requests/s (HTTP)", "req/s", True),
                Metric("cpu_us", "proxy CPU per keep-alive request", "µs", False),
            )

    def describe(self, s: Settings) -> str:
        if self.close:
            return (
                f"wrk -t1 -c{s.http_connections} with `Connection: close`: each request is "
                "connect + GET + 3-byte 200 + close; completed requests/s"
            )
        return f"wrk -t1 -c{s.http_connections}, persistent connections; completed requests/s"

    def backend(self, s: Settings) -> AbstractContextManager[object]:
        return http_backend(self.backend_address, s.workdir, s.log_dir, s.load_cpus)

    def measure(self, s: Settings, target: Running, sample: int) -> Measurement:
        argv = [
            "wrk",
            "--threads",
            "1",
            "--connections",
            str(s.http_connections),
            "--duration",
            f"{max(1, round(s.duration))}s",
            "--timeout",
            "2s",
            "--script",
            str(tool("wrk_json.lua")[1]),
        ]
        if self.close:
            argv += ["--header", "Connection: close"]
        argv.append(f"http://{target.address}/")
        cpu_before = cpu_seconds(target.proc.pid) if target.proc else 0.0
        result = run_json(pinned(argv, s.load_cpus), s.duration + 30)
        cpu = cpu_seconds(target.proc.pid) - cpu_before if target.proc else None
        errors = sum(
            result[k]
            for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
        )
        requests = int(result["requests"])
        if requests == 0 or errors > requests * 0.01:
            raise MeasureError(f"wrk: {requests} requests, {errors} errors: {result}")
        values = {"rate": requests / (result["duration_us"] / 1e6)}
        if cpu is not None:  # the proxy's user+system CPU time over the run, per request
            values["cpu_us"] = cpu / requests * 1e6
        return Measurement(values, {"errors": errors, "wrk_p99_us": result["latency_p99_us"]})


class Latency(Workload):
    key = "latency"
    title = "round-trip latency"
    colocate = True
    metrics = (
        Metric("p50_us", "request latency p50", "µs", False),
        Metric("p99_us", "request latency p99", "µs", False),
    )

    def __init__(self) -> None:
        self.backend_address = Address(BACKEND_HOST, 9000)

    def describe(self, s: Settings) -> str:
        return (
            f"one keep-alive connection, {s.latency_count} GET→200 round trips at "
            f"{s.latency_rate:.0f} req/s; time from send() to the last response byte"
        )

    def backend(self, s: Settings) -> AbstractContextManager[object]:
        return http_backend(self.backend_address, s.workdir, s.log_dir, s.load_cpus)

    def measure(self, s: Settings, target: Running, sample: int) -> Measurement:
        argv = [
            *tool("pingpong.py"),
            target.address.host,
            str(target.address.port),
            "--rate",
            str(s.latency_rate),
            "--count",
            str(s.latency_count),
        ]
        timeout = s.latency_count / s.latency_rate * 3 + 30
        result = run_json(pinned(argv, s.load_cpus), timeout)
        return Measurement(
            {"p50_us": result["p50_us"], "p99_us": result["p99_us"]},
            {"max_us": result["max_us"], "n": result["n"]},
        )


def established(local: Address) -> int:
    """ESTABLISHED TCP sockets whose local end is `local` (the backend side), from /proc."""
    packed = socket.inet_aton(local.host)
    want = f"{int.from_bytes(packed, 'little'):08X}:{local.port:04X}"
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split(maxsplit=4)
            if fields[1] == want and fields[3] == "01":
                count += 1
    return count


def wait_until_closed(backend: Address, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while established(backend) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # and let the server go back to accepting


class IdleMemory(Workload):
    key = "idle-memory"
    title = "memory per idle connection"
    needs_proxy = True
    metrics = (Metric("bytes_per_conn", "RSS per idle proxied connection", "KiB", False, 1 / 1024),)

    def __init__(self) -> None:
        self.backend_address = Address(BACKEND_HOST, 9003)

    def describe(self, s: Settings) -> str:
        return (
            f"{s.idle_connections} idle connections through the proxy (both legs open); "
            "(RSS after - RSS before) / connections, summed over the proxy's process tree"
        )

    def backend(self, s: Settings) -> AbstractContextManager[object]:
        return idle_backend(self.backend_address, s.log_dir, s.load_cpus)

    def measure(self, s: Settings, target: Running, sample: int) -> Measurement:
        if target.proc is None:
            raise MeasureError("idle-memory needs a proxy process")
        pid = target.proc.pid
        time.sleep(0.3)
        before = rss_bytes(pid)
        baseline = established(self.backend_address)
        # A fresh source network per sample keeps TIME_WAIT of earlier samples out of the way.
        argv = [
            *tool("idleconns.py"),
            "open",
            target.address.host,
            str(target.address.port),
            "--count",
            str(s.idle_connections),
            "--source-base",
            f"127.1.{sample % 250}",
            "--max-time",
            "300",
        ]
        client = spawn(
            "idle-client",
            argv,
            s.log_dir,
            s.load_cpus,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert client.popen.stdout is not None
            assert client.popen.stdin is not None
            line = client.popen.stdout.readline().decode()
            if not line.startswith("{"):
                raise MeasureError(f"idle client failed: {client.log_tail()}")
            deadline = time.monotonic() + 30
            upstream = established(self.backend_address) - baseline
            while upstream < s.idle_connections and time.monotonic() < deadline:
                time.sleep(0.2)
                upstream = established(self.backend_address) - baseline
            time.sleep(0.5)
            after = rss_bytes(pid)
            client.popen.stdin.write(b"\n")
            client.popen.stdin.flush()
            client.popen.wait(60)
        finally:
            client.stop()
        if upstream < s.idle_connections:
            raise MeasureError(f"only {upstream} of {s.idle_connections} upstream connections")
        return Measurement(
            {"bytes_per_conn": (after - before) / s.idle_connections},
            {"rss_before": before, "rss_after": after, "upstream": upstream},
        )


class UdpRate(Workload):
    key = "udp-pps"
    title = "UDP 64-byte datagrams/s"
    transport: Transport = "udp"
    metrics = (
        Metric("pps", "UDP 64-byte datagrams/s delivered", "dgram/s", True),
        Metric("cpu_us", "proxy CPU per delivered UDP datagram", "µs", False),
    )

    def __init__(self) -> None:
        self.backend_address = Address(BACKEND_HOST, 9002)

    def describe(self, s: Settings) -> str:
        return (
            f"{s.udp_flows} client sockets send 64-byte datagrams flat out for "
            f"{s.duration:g}s; datagrams/s received by the backend (one-way)"
        )

    def backend(self, s: Settings) -> AbstractContextManager[object]:
        return _nothing()

    def measure(self, s: Settings, target: Running, sample: int) -> Measurement:
        ensure_free(self.backend_address.host, self.backend_address.port, socket.SOCK_DGRAM)
        sink = spawn(
            "udp-sink",
            [
                *tool("udpflood.py"),
                "sink",
                self.backend_address.host,
                str(self.backend_address.port),
                "--max-time",
                str(s.duration + 30),
            ],
            s.log_dir,
            s.load_cpus,
            stdout=subprocess.PIPE,
        )
        cpu_before = cpu_seconds(target.proc.pid) if target.proc else 0.0
        try:
            time.sleep(0.3)  # let the sink bind before the first datagram
            sender = [
                *tool("udpflood.py"),
                "send",
                target.address.host,
                str(target.address.port),
                "--duration",
                str(s.duration),
                "--flows",
                str(s.udp_flows),
            ]
            sent = run_json(pinned(sender, s.load_cpus), s.duration + 30)["sent"]
            out, _ = sink.popen.communicate(timeout=s.duration + 30)
            cpu = cpu_seconds(target.proc.pid) - cpu_before if target.proc else None
        finally:
            sink.stop()
        result = json.loads(out.decode().strip().splitlines()[-1])
        span = result["last"] - result["first"]
        if result["count"] < 100 or span <= 0:
            raise MeasureError(f"UDP sink received {result['count']} of {sent} datagrams")
        values = {"pps": result["count"] / span}
        if cpu is not None:
            values["cpu_us"] = cpu / result["count"] * 1e6
        return Measurement(values, {"sent": sent, "received": result["count"]})


class DnsSessions(Workload):
    """A new UDP session per query: how a stub resolver reaches a DNS service (every query
    from a new source port), the commonest UDP traffic in a cluster."""

    transport: Transport = "udp"
    # One query at a time: as for latency, all on one CPU (a cross-CPU wakeup costs more here
    # than any proxy adds), so the rate and p50 are the cost of the path itself.
    colocate = True
    metrics = (
        Metric("rate", "new UDP sessions/s (DNS queries, one at a time)", "query/s", True),
        Metric("p50", "DNS query latency p50, new session each", "µs", False),
        Metric("cpu_us", "proxy CPU per new UDP session (DNS query)", "µs", False),
    )

    def __init__(self, replies: int | None = None) -> None:
        """``replies``: sessions end after this many replies (lbd's ``udpResponses``, nginx's
        ``proxy_responses``), as a DNS service is usually set up; None: on idle only."""
        self.backend_address = Address(BACKEND_HOST, 9053)
        self.replies = replies
        self.key = "dns-sessions" if replies is None else "dns-replied"
        self.title = "new UDP sessions (DNS queries, a new socket each)" + (
            "" if replies is None else f", sessions end after {replies} reply"
        )
        if replies is not None:
            self.metrics = tuple(
                Metric(m.key, f"{m.title}, ending at the reply", m.unit, m.higher_is_better)
                for m in DnsSessions.metrics
            )

    @property
    def route(self) -> Route:
        return Route(self.transport, self.backend_address, self.replies)

    def describe(self, s: Settings) -> str:
        ending = (
            ""
            if self.replies is None
            else "; sessions end at the answer (udpResponses: 1, proxy_responses 1)"
        )
        return (
            f"{s.dns_queries} DNS queries to dnsmasq (hosts file only), one at a time, each from "
            f"a new socket; answered queries/s and send-to-answer p50{ending}"
        )

    def backend(self, s: Settings) -> AbstractContextManager[object]:
        return dns_backend(self.backend_address, s.workdir, s.log_dir, s.load_cpus)

    def measure(self, s: Settings, target: Running, sample: int) -> Measurement:
        cpu_before = cpu_seconds(target.proc.pid) if target.proc else 0.0
        argv = [
            *tool("dnsquery.py"),
            target.address.host,
            str(target.address.port),
            DNS_NAME,
            "--count",
            str(s.dns_queries),
        ]
        result = run_json(pinned(argv, s.load_cpus), 120)
        cpu = cpu_seconds(target.proc.pid) - cpu_before if target.proc else None
        answered = result["answered"]
        if answered < s.dns_queries * 0.99:
            raise MeasureError(f"only {answered} of {s.dns_queries} queries answered")
        values = {"rate": answered / result["elapsed_s"], "p50": result["p50_us"]}
        if cpu is not None:
            # The tool's warm-up query is in it too: one in thousands.
            values["cpu_us"] = cpu / answered * 1e6
        return Measurement(values, {"p99_us": result["p99_us"], "answered": answered})


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def all_workloads() -> list[Workload]:
    return [
        Bulk(1),
        Bulk(8),
        Http(close=True),
        Http(close=False),
        Latency(),
        IdleMemory(),
        UdpRate(),
        DnsSessions(),
        DnsSessions(replies=1),
    ]
