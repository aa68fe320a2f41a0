"""lbd's CPU cost of one proxied short connection (connect, small request, reply, close).

lbd (1 worker, ``python -m lbd run``, pinned to one CPU) sits in front of nginx answering
``return 200``; wrk (``Connection: close``, so every request is a new connection) and nginx share
the other CPU. wrk stops after exactly ``--connections`` responses (a Lua counter), and every run
is bounded in time too. The result is lbd's user and system CPU time (``/proc/PID/stat``) divided
by the connections: on a small shared machine CPU time moves far less with other load than rates
do. Optional extras over a separate, fixed count of connections:

- ``--strace N``: ``strace -c -f -p PID`` while N connections go through: syscalls per connection.
- ``--py-spy N``: ``py-spy record --native`` while N connections go through: the functions with
  the most samples (self and inclusive).

    python benchmarks/conn_cost.py [--connections 20000] [--repeats 3] [--strace 5000]
        [--py-spy 20000]

Traffic stays on 127.x. Every process started here is stopped by its PID.
"""

from __future__ import annotations

import argparse
import collections
import json
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

HOST = "127.78.0.1"
BACKEND = "127.78.0.2"
REPO = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")

# Stop after a fixed count of responses (one wrk thread: a plain global counts them all), and
# print the totals as JSON for this script to parse.
WRK_SCRIPT = """
wrk.headers["Connection"] = "close"
local done_count = 0
local limit = tonumber(os.getenv("CONN_COST_LIMIT"))
response = function(status, headers, body)
   done_count = done_count + 1
   if done_count >= limit then wrk.thread:stop() end
end
done = function(summary, latency, requests)
   local e = summary.errors
   io.write(string.format('{"requests": %d, "duration_us": %d, "errors": %d}\\n',
      summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(user, system) clock ticks of one process (lbd with 1 worker is one process)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


# Connections/s through lbd, from the warm-up. wrk's main thread sleeps for the whole -d even
# once the Lua counter has stopped its thread, so -d is sized from this to end soon after.
RATE = {"estimate": 0.0}


def drive(url: str, count: int, cpus: str, work: Path, timeout: float) -> int:
    """Run wrk until ``count`` responses (or ``timeout`` s); return the requests it completed."""
    script = work / "conn_cost.lua"
    script.write_text(WRK_SCRIPT)
    seconds = timeout
    if RATE["estimate"]:
        seconds = min(timeout, 2 + 2 * count / RATE["estimate"])
    out = subprocess.run(
        ["taskset", "-c", cpus, "wrk", "-t1", "-c32", f"-d{seconds:.0f}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
        env={**os.environ, "CONN_COST_LIMIT": str(count)},
    ).stdout
    line = next(text for text in out.splitlines() if text.startswith("{"))
    result = json.loads(line)
    if result["errors"]:
        print(f"    wrk errors: {result['errors']}", file=sys.stderr)
    return int(result["requests"])


def warm_up(url: str, cpus: str, work: Path) -> None:
    """Two seconds of unbounded load: warms lbd up and estimates the rate (the lowest seen)."""
    done = drive(url, 10**12, cpus, work, timeout=2)
    rate = done / 2
    RATE["estimate"] = min(RATE["estimate"] or rate, rate)
    print(f"warm-up {url}: about {rate:,.0f} connections/s")


def measure(pid: int, url: str, count: int, cpus: str, work: Path) -> tuple[float, float, int]:
    """us of user and system CPU per connection, and the connections done."""
    user0, sys0 = cpu_ticks(pid)
    done = drive(url, count, cpus, work, timeout=60)
    user1, sys1 = cpu_ticks(pid)
    scale = 1e6 / TICK / max(done, 1)
    return (user1 - user0) * scale, (sys1 - sys0) * scale, done


def strace_counts(pid: int, url: str, count: int, cpus: str, work: Path) -> None:
    out = work / "strace.txt"
    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(pid)])
    time.sleep(1.0)  # attached
    done = drive(url, count, cpus, work, timeout=120)
    tracer.send_signal(signal.SIGINT)  # ours, by PID: strace detaches and writes its table
    tracer.wait(30)
    rows: list[tuple[str, int]] = []
    for text in out.read_text().splitlines():
        parts = text.split()
        if len(parts) >= 5 and re.fullmatch(r"[\d.]+", parts[0]) and parts[-1] != "total":
            calls = int(parts[3])
            rows.append((parts[-1], calls))
    total = sum(calls for _, calls in rows)
    print(f"\nsyscalls per connection ({done} connections under strace):")
    for name, calls in sorted(rows, key=lambda row: -row[1]):
        if calls / done >= 0.05:
            print(f"  {name:<16} {calls / done:6.2f}")
    print(f"  {'total':<16} {total / done:6.2f}")


def py_spy_top(pid: int, url: str, count: int, cpus: str, work: Path, top: int = 40) -> None:
    out = work / "py-spy.txt"
    recorder = subprocess.Popen(
        [
            "py-spy",
            "record",
            "--native",
            "-r",
            "500",
            "-f",
            "raw",
            "-o",
            str(out),
            "-p",
            str(pid),
            "-d",
            "120",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.5)  # attached
    drive(url, count, cpus, work, timeout=110)
    recorder.send_signal(signal.SIGINT)  # ours, by PID: py-spy writes what it has
    recorder.wait(60)
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for text in out.read_text().splitlines():
        stack, _, samples = text.rpartition(" ")
        if not samples.isdigit():
            continue
        # "name (file:line)" -> "name (file)": one entry per function, not per line.
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        if frames and frames[-1].startswith(("epoll_wait", "epoll_pwait")):
            continue  # waiting in the poller (py-spy samples wall-clock time): not work
        weight = int(samples)
        total += weight
        own[frames[-1]] += weight
        for frame in set(frames):
            inclusive[frame] += weight
    print(f"\npy-spy ({total} busy samples): top self")
    for name, n in own.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("py-spy: top inclusive")
    for name, n in inclusive.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {name}")


def perf_top(pid: int, url: str, count: int, cpus: str, work: Path, top: int = 60) -> None:
    """Where lbd's CPU goes, kernel included (``perf record``; needs perf_event access)."""
    data = work / "perf.data"
    recorder = subprocess.Popen(
        ["perf", "record", "-q", "-g", "-F", "2000", "-o", str(data), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    drive(url, count, cpus, work, timeout=60)
    recorder.send_signal(signal.SIGINT)  # ours, by PID
    recorder.wait(60)
    report = subprocess.run(
        [
            "perf",
            "report",
            "-i",
            str(data),
            "--stdio",
            "--children",
            "--sort",
            "sym",
            "-g",
            "none",
            "--percent-limit",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    # Inclusive ("children") and own shares: the kernel's syscall entry points (connect,
    # write, close...) say which calls cost the most, including the peers' TCP work that
    # loopback runs in lbd's context.
    rows = [line.split() for line in report.splitlines() if line.strip() and line[0] != "#"]
    print(f"\nperf ({count} connections): inclusive / own share of lbd's CPU")
    for row in rows[:top]:
        if len(row) >= 4:
            print(f"  {row[0]:>7} {row[1]:>7} {row[2]} {' '.join(row[3:])}")


def start_lbd(source: Path, work: Path, backend_port: int, args: argparse.Namespace) -> Lbd:
    port = free_port(HOST)
    config = work / f"lbd-{port}.yaml"
    config.write_text(
        "apiVersion: lbd/v1\nadmin: {enabled: false}\nservices:\n"
        f"  - name: web\n    clusterIP: {HOST}\n"
        f"    ports: [{{port: {port}, targetPort: {backend_port}}}]\n"
        f"    endpoints: [{{address: {BACKEND}}}]\n"
    )
    # cwd=source and -m: that tree's lbd package is the one imported.
    argv = ["taskset", "-c", args.lbd_cpus, sys.executable, "-m", "lbd", "run", str(config)]
    argv += ["--no-watch", "--log-level=warning", f"--loop={args.loop}"]
    proc = subprocess.Popen(argv, cwd=source)
    wait_listening(HOST, port)
    url = f"http://{HOST}:{port}/"
    warm_up(url, args.load_cpus, work)
    return Lbd(source, proc, url)


class Lbd:
    def __init__(self, source: Path, proc: subprocess.Popen[bytes], url: str) -> None:
        self.source = source
        self.proc = proc
        self.url = url
        self.samples: list[tuple[float, float]] = []


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--source",
        type=Path,
        action="append",
        help="a source tree whose lbd to measure (repeat to compare trees, measured in turns); "
        "default: this one",
    )
    parser.add_argument("--strace", type=int, default=0, help="connections under strace -c")
    parser.add_argument("--py-spy", type=int, default=0, help="connections under py-spy")
    parser.add_argument("--perf", type=int, default=0, help="connections under perf record")
    parser.add_argument("--load-cpus", default="0", help="taskset list for wrk and nginx")
    parser.add_argument("--lbd-cpus", default="1", help="taskset list for lbd")
    parser.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    args = parser.parse_args()
    sources = args.source or [REPO]
    work = Path(tempfile.mkdtemp(prefix="lbd-conn-cost-"))
    nginx, backend_port = start_ok_backend(work, BACKEND, args.load_cpus)
    targets: list[Lbd] = []
    try:
        for source in sources:
            targets.append(start_lbd(source, work, backend_port, args))
        for repeat in range(args.repeats):
            for lbd in targets:  # in turns, so each tree sees the same noise
                user, system, done = measure(
                    lbd.proc.pid, lbd.url, args.connections, args.load_cpus, work
                )
                lbd.samples.append((user, system))
                print(
                    f"repeat {repeat + 1} {lbd.source}: {done} connections, lbd CPU per "
                    f"connection {user + system:.1f} us (user {user:.1f}, sys {system:.1f})"
                )
        for lbd in targets:
            user = statistics.median(u for u, _ in lbd.samples)
            system = statistics.median(s for _, s in lbd.samples)
            total = statistics.median(u + s for u, s in lbd.samples)
            print(
                f"median {lbd.source}: {total:.1f} us per connection "
                f"(user {user:.1f}, sys {system:.1f})"
            )
        for lbd in targets:
            pid, url = lbd.proc.pid, lbd.url
            if args.strace or args.perf or args.py_spy:
                print(f"\n== {lbd.source}")
            if args.strace:
                strace_counts(pid, url, args.strace, args.load_cpus, work)
            if args.perf:
                perf_top(pid, url, args.perf, args.load_cpus, work)
            if args.py_spy:
                py_spy_top(pid, url, args.py_spy, args.load_cpus, work)
    finally:
        for lbd in targets:
            lbd.proc.send_signal(signal.SIGTERM)  # ours, by PID
            lbd.proc.wait(30)
        nginx.send_signal(signal.SIGQUIT)  # ours, by PID
        nginx.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
