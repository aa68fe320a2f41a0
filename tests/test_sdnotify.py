"""sd_notify: the datagrams lbd sends to ``$NOTIFY_SOCKET``, received on a socket the test
binds where systemd's would be, with each sender's pid (SCM_CREDENTIALS, as systemd reads it)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from lbd.process.sdnotify import ServiceNotifier, socket_address, watchdog_interval
from tests.procs import alive, lbd_process, run_cli
from tests.support import (
    dead_port,
    document,
    echo_backend,
    fresh_ip,
    read_name,
    service_yaml,
    until,
)


@dataclass
class Notification:
    pid: int
    at: float  # loop time of arrival
    fields: dict[str, str]


@dataclass
class NotifySocket:
    """systemd's end of the notification socket."""

    sock: socket.socket
    received: list[Notification] = field(default_factory=list)
    # Runs as each notification arrives, before this loop does anything else: what the
    # notifying process has done by then, it did before it sent the notification.
    on_arrival: Callable[[Notification], None] | None = None
    _new: asyncio.Event = field(default_factory=asyncio.Event)

    def read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:  # until EAGAIN: a reader may see each readiness once
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except BlockingIOError:
                return
            pid = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:12])[0]
            lines = data.decode().split("\n")
            fields = dict(line.partition("=")[::2] for line in lines if line)
            notification = Notification(pid, loop.time(), fields)
            if self.on_arrival is not None:
                self.on_arrival(notification)
            self.received.append(notification)
            self._new.set()

    def matching(self, assignment: str, pid: int | None = None) -> list[Notification]:
        """Notifications that carry ``assignment`` (``KEY=VALUE``), from ``pid`` if given."""
        key, _, value = assignment.partition("=")
        return [
            n for n in self.received if n.fields.get(key) == value and (pid is None or n.pid == pid)
        ]

    async def wait_for(
        self,
        assignment: str,
        pid: int | None = None,
        count: int = 1,
        timeout: float = 30,
    ) -> Notification:
        async def found() -> Notification:
            while len(self.matching(assignment, pid)) < count:
                self._new.clear()
                await self._new.wait()
            return self.matching(assignment, pid)[count - 1]

        try:
            return await asyncio.wait_for(found(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"no {assignment} (x{count}) within {timeout}s; last: {self.received[-5:]}"
            ) from None


@contextlib.asynccontextmanager
async def notify_socket(address: str | bytes) -> AsyncIterator[NotifySocket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    loop = asyncio.get_running_loop()
    try:
        sock.bind(address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.setblocking(False)
        receiver = NotifySocket(sock)
        loop.add_reader(sock.fileno(), receiver.read)
        try:
            yield receiver
        finally:
            loop.remove_reader(sock.fileno())
    finally:
        sock.close()


def abstract_name() -> str:
    return f"@lbd-test-notify-{os.getpid()}-{fresh_ip()}"


# -- the environment ----------------------------------------------------------------------------


def test_socket_address_forms() -> None:
    assert socket_address("/run/systemd/notify") == b"/run/systemd/notify"
    assert socket_address("@abc") == b"\0abc"
    assert socket_address("@") is None
    assert socket_address("vsock:2:1234") is None
    assert socket_address("relative/path") is None


def test_watchdog_interval_is_half_of_watchdog_usec_for_our_pid_only() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert watchdog_interval({}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "41"}, 42) is None
    environ = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "42"}
    assert watchdog_interval(environ, 42) == 1.0
    # Ours: removed, so that a successor (seamless restart) feeds the watchdog in turn.
    assert environ == {"WATCHDOG_USEC": "2000000"}


def test_notifier_from_environment() -> None:
    assert not ServiceNotifier.from_environment({}).active
    assert not ServiceNotifier.from_environment({"NOTIFY_SOCKET": "vsock:2:9"}).active
    disabled = ServiceNotifier.from_environment({"NOTIFY_SOCKET": "/x"}, enabled=False)
    assert not disabled.active and not disabled.notify("READY=1")
    active = ServiceNotifier.from_environment({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000"})
    assert active.address == b"/x" and active.interval_s == 0.0005


# -- real sockets, in this process ----------------------------------------------------------------


async def test_notifies_a_path_and_an_abstract_socket(tmp_path: Path) -> None:
    for address in (str(tmp_path / "n"), abstract_name()):
        async with notify_socket(socket_address(address) or b"") as systemd:
            notifier = ServiceNotifier.from_environment({"NOTIFY_SOCKET": address})
            notifier.ready()
            got = await systemd.wait_for("READY=1", timeout=5)
            notifier.close()
        assert got.pid == os.getpid() and got.fields["MAINPID"] == str(os.getpid())


async def test_an_unreachable_socket_never_raises(tmp_path: Path) -> None:
    notifier = ServiceNotifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert not notifier.notify("READY=1")
    assert not notifier.notify("WATCHDOG=1")
    notifier.close()


async def _run_until_stopping(
    tmp_path: Path, handed_off: Callable[[], bool]
) -> tuple[NotifySocket, ServiceNotifier]:
    stopping = asyncio.Event()
    path = str(tmp_path / "n")
    async with notify_socket(path) as systemd:
        notifier = ServiceNotifier.from_environment(
            {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "40000"}
        )
        notifier.start(stopping, handed_off)
        await systemd.wait_for("WATCHDOG=1", count=3, timeout=5)
        stopping.set()
        await until(lambda: all(t.done() for t in notifier._tasks[1:]), what="stopping seen")
        systemd.read()
    return systemd, notifier


async def test_keep_alives_then_stopping(tmp_path: Path) -> None:
    systemd, notifier = await _run_until_stopping(tmp_path, lambda: False)
    notifier.close()
    gaps = [b.at - a.at for a, b in zip(systemd.received, systemd.received[1:], strict=False)]
    assert min(gaps[:2]) >= 0.01  # every 20 ms (half of 40 ms), not a spin
    assert [n.fields for n in systemd.received][-1] == {"STOPPING": "1"}


async def test_after_a_handoff_the_predecessor_stays_silent(tmp_path: Path) -> None:
    systemd, notifier = await _run_until_stopping(tmp_path, lambda: True)
    assert all(t.done() for t in notifier._tasks)  # no more keep-alives either
    notifier.close()
    assert systemd.matching("STOPPING=1") == []


# -- real lbd processes ---------------------------------------------------------------------------


async def readyz(admin: str) -> int:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(f"http://{admin}/readyz") as response:
            return response.status


async def workers_serving(admin: str) -> float:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(f"http://{admin}/metrics") as response:
            text = await response.text()
    [line] = [line for line in text.splitlines() if line.startswith("lbd_workers ")]
    return float(line.split()[1])


def lbd_config(
    tmp_path: Path, backend: tuple[str, int], workers: int
) -> tuple[Path, str, int, str]:
    """A config on fixed fresh addresses (known before lbd logs them): path, listener, admin."""
    ip, admin_ip = fresh_ip(), fresh_ip()
    port, admin = dead_port(ip), f"{admin_ip}:{dead_port(admin_ip)}"
    text = document(
        service_yaml("svc", [backend], cluster_ip=ip, port=port), admin=f"{{address: '{admin}'}}"
    )
    path = tmp_path / "lbd.yaml"
    path.write_text(
        text.replace("apiVersion: lbd/v1\n", f"apiVersion: lbd/v1\nworkers: {workers}\n")
    )
    return path, ip, port, admin


# systemd puts the main process's own pid in WATCHDOG_PID: a shell that execs lbd does the same.
AS_MAIN_PID = ["sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh"]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
async def test_ready_watchdog_stopping(tmp_path: Path, workers: int) -> None:
    async with echo_backend("b1") as backend:
        path, ip, port, admin = lbd_config(tmp_path, backend[:2], workers)
        address = str(tmp_path / "n")
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
        accepted_at_ready: list[bool] = []

        def connect_at_ready(notification: Notification) -> None:
            if notification.fields.get("READY") == "1":
                admin_host, _, admin_port = admin.rpartition(":")
                for target in ((ip, port), (admin_host, int(admin_port))):
                    try:  # blocking on purpose: nothing else may run first (loopback: instant)
                        socket.create_connection(target, timeout=5).close()
                        accepted_at_ready.append(True)
                    except OSError:
                        accepted_at_ready.append(False)

        async with notify_socket(address) as systemd:
            systemd.on_arrival = connect_at_ready
            async with lbd_process(path, wrapper=AS_MAIN_PID, env=env) as lbd:
                ready = await systemd.wait_for("READY=1")
                # At READY=1 it serves already: the listener accepts, the admin API is ready,
                # and with workers every one of them serves.
                assert accepted_at_ready == [True, True]  # the listener and the admin API
                assert await read_name(ip, port) == "b1"
                assert await readyz(admin) == 200
                if workers > 1:
                    assert await workers_serving(admin) == workers
                pid = lbd.process.pid
                assert ready.pid == pid and ready.fields["MAINPID"] == str(pid)
                keep_alives = [
                    await systemd.wait_for("WATCHDOG=1", pid=pid, count=n) for n in (3, 6)
                ]
                assert keep_alives[1].at - keep_alives[0].at >= 0.2  # 3 gaps of ~0.1 s
                lbd.signal(signal.SIGTERM)
                stopping = await systemd.wait_for("STOPPING=1")
                assert await lbd.wait_exit(30) == 0
            systemd.read()  # whatever arrived before it exited
        assert stopping.pid == pid and stopping.at > ready.at
        # Only the main process talks to systemd (workers never), READY once, STOPPING once.
        assert {n.pid for n in systemd.received} == {pid}
        assert len(systemd.matching("READY=1")) == 1 and len(systemd.matching("STOPPING=1")) == 1


@pytest.mark.slow
async def test_seamless_restart_hands_the_unit_to_the_successor(tmp_path: Path) -> None:
    """``lbd restart`` under systemd: the successor says MAINPID= with READY=1 and feeds the
    watchdog; the predecessor drains and exits without STOPPING=1 (which would stop the unit)."""
    async with echo_backend("b1") as backend:
        path, ip, port, _ = lbd_config(tmp_path, backend[:2], 1)
        address, pid_file = abstract_name(), tmp_path / "lbd.pid"
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
        async with notify_socket(socket_address(address) or b"") as systemd:
            async with lbd_process(
                path, "--pid-file", str(pid_file), wrapper=AS_MAIN_PID, env=env
            ) as old:
                successor = 0
                try:
                    await systemd.wait_for("READY=1", pid=old.process.pid)
                    await old.wait_event("restart socket listening")
                    code, _, err = await run_cli("restart", "--pid-file", str(pid_file))
                    assert code == 0, err
                    # Not wait_exit: the successor holds the same stderr pipe open.
                    assert await asyncio.wait_for(old.process.wait(), 60) == 0
                    successor = int(pid_file.read_text())
                    ready = await systemd.wait_for("READY=1", pid=successor)
                    assert ready.fields["MAINPID"] == str(successor)
                    await systemd.wait_for("WATCHDOG=1", pid=successor, count=2)
                    assert systemd.matching("STOPPING=1") == []
                    assert await read_name(ip, port) == "b1"
                    os.kill(successor, signal.SIGTERM)  # started by our lbd, by its PID
                    await systemd.wait_for("STOPPING=1", pid=successor)
                    await until(lambda: not alive(successor), 20)  # not our child
                finally:
                    with contextlib.suppress(OSError, ValueError):  # failed half-way
                        successor = successor or int(pid_file.read_text())
                    if successor not in (0, old.process.pid) and alive(successor):
                        os.kill(successor, signal.SIGKILL)  # started by our lbd, by its PID
