"""Child processes of the harness: start pinned, wait until ready, measure, stop by PID."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Enough descriptors for the idle-connection workload (client + upstream side of 10k
# connections), capped by the hard limit: without CAP_SYS_RESOURCE (e.g. in a container) the hard
# limit cannot be raised, and then every process, proxies included, lives within it.
_HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
NOFILE = 65536 if _HARD == resource.RLIM_INFINITY else min(65536, _HARD)


def max_proxied_connections(spare: int = 500) -> int:
    """How many connections a proxy (two descriptors each) can hold within NOFILE."""
    return (NOFILE - spare) // 2


def _raise_nofile() -> None:
    """Runs in the child before exec: lift RLIMIT_NOFILE so no target is limited by the shell's."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def raise_own_nofile() -> None:
    """Lift the harness's own soft limit to NOFILE."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def pinned(argv: Sequence[str], cpus: str | None) -> list[str]:
    """Prefix argv with taskset so the pinning is visible in the logged command line."""
    return ["taskset", "-c", cpus, *argv] if cpus else list(argv)


@dataclass
class Proc:
    """One started child. `stop()` signals only this PID (a master stops its own children)."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    exit_code: int | None = field(default=None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
        """Signal the process, wait up to `timeout`, then SIGKILL it. Returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.exit_code = self.popen.returncode
        return self.exit_code

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def spawn(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    cpus: str | None = None,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = None,
) -> Proc:
    """Start argv (optionally pinned); stderr (and stdout unless piped) go to log_dir/name.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    full = pinned(argv, cpus)
    with log_path.open("ab") as log:
        log.write(f"$ {' '.join(full)}\n".encode())
        log.flush()
        popen = subprocess.Popen(
            full,
            stdin=stdin,
            stdout=stdout if stdout is not None else log,
            stderr=log,
            preexec_fn=_raise_nofile,
            start_new_session=True,  # a Ctrl+C in the terminal reaches only the harness
        )
    return Proc(name=name, argv=full, popen=popen, log_path=log_path)


class NotReadyError(RuntimeError):
    pass


def ensure_free(host: str, port: int, kind: int = socket.SOCK_STREAM) -> None:
    """Fail if something already listens on host:port: a readiness probe would then succeed
    against the stranger (a leftover server from an earlier run) instead of our process."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise NotReadyError(f"{host}:{port} is already in use by another process") from exc


def free_port(host: str) -> int:
    """A port the kernel says is free on ``host`` now (for a backend that needs one upfront)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_listening(host: str, port: int, timeout: float = 20.0) -> None:
    """Poll-connect until something accepts on host:port (a process we did not spawn via
    ``spawn``); exit the script if nothing does within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {host}:{port}")


def start_ok_backend(work: Path, host: str, cpus: str) -> tuple[subprocess.Popen[bytes], int]:
    """nginx answering every request with 200 "ok" on a free port of ``host``, pinned to
    ``cpus``; returns the process (stop it by PID) and the port, once it listens."""
    port = free_port(host)
    (work / "nginx.conf").write_text(
        f"worker_processes 1; daemon off; pid {work}/nginx.pid; error_log {work}/err.log;\n"
        f"events {{ worker_connections 4096; }}\n"
        f"http {{ access_log off; server {{ listen {host}:{port} backlog=4096;\n"
        f"  location / {{ return 200 'ok'; }} }} }}\n"
    )
    nginx = subprocess.Popen(
        ["taskset", "-c", cpus, "nginx", "-c", str(work / "nginx.conf"), "-p", str(work)]
    )
    try:
        wait_listening(host, port)
    except BaseException:
        nginx.terminate()
        nginx.wait()
        raise
    return nginx, port


def wait_log_line(proc: Proc, text: str, timeout: float = 30.0) -> None:
    """Wait until ``text`` appears in the process's log; fail early if it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise NotReadyError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log_tail()}")
        try:
            if text in proc.log_path.read_text(errors="replace"):
                return
        except OSError:
            pass  # not written yet
        time.sleep(0.05)
    raise NotReadyError(f"{proc.name} did not log {text!r} within {timeout}s")


def wait_tcp_ready(proc: Proc, host: str, port: int, timeout: float = 15.0) -> None:
    """Poll-connect until the listener accepts; fail early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise NotReadyError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log_tail()}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise NotReadyError(f"{proc.name} did not accept on {host}:{port} within {timeout}s")


def _udp_bound(host: str, port: int) -> bool:
    want = f"{socket.htonl(int.from_bytes(socket.inet_aton(host), 'big')):08X}:{port:04X}"
    try:
        lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(line.split()[1] == want for line in lines)


def wait_udp_ready(proc: Proc, host: str, port: int, timeout: float = 15.0) -> None:
    """UDP has no handshake: wait until a socket is bound to host:port (seen in /proc/net/udp)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise NotReadyError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log_tail()}")
        if _udp_bound(host, port):
            return
        time.sleep(0.05)
    raise NotReadyError(f"{proc.name} did not bind udp {host}:{port} within {timeout}s")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            kids.extend(int(k) for k in text.split())
    except OSError:
        pass
    return kids


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (nginx master + workers, a supervisor + its workers)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
    return tree


def _cpu_times() -> dict[str, tuple[int, int]]:
    """Per CPU: (busy, total) jiffies from /proc/stat."""
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            values = [int(v) for v in fields[:8]]
            idle = values[3] + values[4]  # idle + iowait
            times[name] = (sum(values) - idle, sum(values))
    return times


def cpu_busy(seconds: float = 1.0) -> dict[str, float]:
    """Per-CPU busy percentage over `seconds`: what else is running on a shared machine."""
    before = _cpu_times()
    time.sleep(seconds)
    after = _cpu_times()
    busy = {}
    for cpu, (busy_after, total_after) in after.items():
        busy_before, total_before = before.get(cpu, (busy_after, total_after))
        span = total_after - total_before
        busy[cpu] = round(100 * (busy_after - busy_before) / span, 1) if span else 0.0
    return busy


def cpu_seconds(pid: int) -> float:
    """User + system CPU time consumed so far by a process tree (live members), in seconds."""
    ticks = 0
    for member in process_tree(pid):
        try:
            text = Path(f"/proc/{member}/stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()  # fields after the command name
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Summed VmRSS of a process tree, in bytes."""
    total = 0
    for member in process_tree(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total
