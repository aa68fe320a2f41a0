"""Seamless restart: ``lbd restart`` under a loop of short connections refuses none."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
from pathlib import Path

import pytest

from tests.procs import alive, lbd_process, restart, run_cli
from tests.support import (
    dead_port,
    document,
    echo_backend,
    fresh_ip,
    read_name,
    service_yaml,
    until,
)

pytestmark = pytest.mark.slow


def _successor_of(pid_file: Path, predecessor: int) -> int:
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text())
        if pid != predecessor and alive(pid):
            return pid
    return 0


class Load:
    """Short connections, one after another, until ``stop`` (bounded: at most 20,000)."""

    def __init__(self) -> None:
        self.ok = 0
        self.errors: list[str] = []
        self.stop = asyncio.Event()

    async def run(self, host: str, port: int) -> None:
        for _ in range(20_000):
            if self.stop.is_set():
                break
            try:
                assert await read_name(host, port) == "b1"
                self.ok += 1
            except (OSError, AssertionError, TimeoutError) as error:
                self.errors.append(repr(error))


@pytest.mark.parametrize("workers", [1, 2])
async def test_restart_under_load_refuses_no_connection(tmp_path: Path, workers: int) -> None:
    async with echo_backend("b1") as (bh, bp, _):
        ip = fresh_ip()
        port = dead_port(ip)
        text = document(service_yaml("svc", [(bh, bp)], cluster_ip=ip, port=port))
        path = tmp_path / "lbd.yaml"
        path.write_text(
            text.replace("apiVersion: lbd/v1\n", f"apiVersion: lbd/v1\nworkers: {workers}\n")
        )
        pid_file = tmp_path / "lbd.pid"
        async with lbd_process(path, "--pid-file", str(pid_file)) as old:
            await old.wait_event("lbd started", timeout=30)
            await old.wait_event("restart socket listening")
            restart_socket = tmp_path / "lbd.pid.restart"
            assert stat.S_IMODE(restart_socket.stat().st_mode) == 0o600
            load = Load()
            task = asyncio.create_task(load.run(ip, port))
            successor, before = 0, 0
            try:
                await until(lambda: load.ok >= 50, 20)  # under load before the restart
                successor = await restart(old, pid_file)
                before = load.ok
                await until(lambda: load.ok >= before + 50, 20)  # and after it
            finally:
                load.stop.set()
                await asyncio.wait_for(task, 30)
                if not successor:  # failed half-way: a successor may still be running
                    successor = _successor_of(pid_file, old.process.pid)
                if successor:
                    os.kill(successor, signal.SIGTERM)  # started by our lbd, by its PID
                    await until(lambda: not alive(successor), 20)  # not our child
            assert load.errors == [] and load.ok >= before + 50
            assert not pid_file.exists()


async def test_takeover_without_a_running_lbd_exits_3(tmp_path: Path) -> None:
    path = tmp_path / "lbd.yaml"
    path.write_text(document(service_yaml("svc", [(fresh_ip(), 80)])))
    code, _, err = await run_cli("run", str(path), f"--takeover={tmp_path / 'nothing'}")
    assert code == 3 and "no running lbd" in err
    with contextlib.suppress(FileNotFoundError):
        (tmp_path / "nothing").unlink()


async def _next_pid(pid_file: Path, before: int, timeout: float) -> int:
    """The pid the file names once it names another live process than ``before``."""
    found: list[int] = []

    def changed() -> bool:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text())
            if pid != before:
                found.append(pid)
                return True
        return False

    await until(changed, timeout, step=0.001, what=f"{pid_file} to name another pid")
    return found[-1]


def _end(*pids: int) -> None:
    """SIGTERM successors our lbd started (by PID) that still run."""
    for pid in pids:
        if pid and alive(pid):
            os.kill(pid, signal.SIGTERM)


def _gone(pid: int) -> bool:
    """Exited and reaped: no zombie is left (``alive`` is true for a zombie)."""
    return not Path(f"/proc/{pid}").exists()


def _config(tmp_path: Path, backend: tuple[str, int], ip: str, port: int) -> Path:
    path = tmp_path / "lbd.yaml"
    path.write_text(document(service_yaml("svc", [backend], cluster_ip=ip, port=port)))
    return path


async def test_a_restart_signal_while_the_successor_starts_is_served_later(
    tmp_path: Path,
) -> None:
    """Two ``lbd restart``s in a row: the second reaches the successor while it starts (its
    pid file is written, its handlers are not installed yet). It must not kill it: the restart
    happens once the successor serves, and the pid file names a live lbd all along."""
    async with echo_backend("b1") as (bh, bp, _):
        ip = fresh_ip()
        port = dead_port(ip)
        path = _config(tmp_path, (bh, bp), ip, port)
        pid_file = tmp_path / "lbd.pid"
        async with lbd_process(path, "--pid-file", str(pid_file)) as old:
            await old.wait_event("restart socket listening", timeout=30)
            load = Load()
            task = asyncio.create_task(load.run(ip, port))
            second = third = 0
            try:
                await until(lambda: load.ok >= 20, 20)
                old.signal(signal.SIGUSR2)
                second = await _next_pid(pid_file, old.process.pid, 30)
                os.kill(second, signal.SIGUSR2)  # while it starts (our lbd started it)
                await old.wait_event("restart: the next lbd serves; draining and exiting", 60)
                assert await asyncio.wait_for(old.process.wait(), 30) == 0
                third = await _next_pid(pid_file, second, 60)
                await old.wait_event("restart: the next lbd serves; draining and exiting", 60, 2)
                await until(lambda: not alive(second), 30, what="the second lbd to exit")
                assert alive(third)
                before = load.ok
                await until(lambda: load.ok >= before + 20, 20)
                code, out, err = await run_cli("reload", "--pid-file", str(pid_file))
                assert code == 0 and out == f"lbd reload: sent SIGHUP to {third}\n", err
            finally:
                load.stop.set()
                await asyncio.wait_for(task, 30)
                _end(second, third)
            assert load.errors == []


async def test_a_successor_that_fails_gives_the_pid_file_back(tmp_path: Path) -> None:
    """The new config cannot be served (its port is taken): the successor exits, the running
    lbd keeps serving, reaps it, and the pid file names the running lbd again."""
    async with echo_backend("b1") as (bh, bp, _):
        ip = fresh_ip()
        port = dead_port(ip)
        path = _config(tmp_path, (bh, bp), ip, port)
        pid_file = tmp_path / "lbd.pid"
        taken_ip = fresh_ip()
        with socket.socket() as taken:
            taken.bind((taken_ip, 0))
            taken.listen()
            async with lbd_process(path, "--pid-file", str(pid_file), "--no-watch") as old:
                await old.wait_event("restart socket listening", timeout=30)
                other = service_yaml(
                    "other", [(bh, bp)], cluster_ip=taken_ip, port=taken.getsockname()[1]
                )
                path.write_text(
                    document(service_yaml("svc", [(bh, bp)], cluster_ip=ip, port=port), other)
                )
                code, _, err = await run_cli("restart", "--pid-file", str(pid_file))
                assert code == 0, err
                failed = await old.wait_event(
                    "restart failed: the next lbd did not start; still serving", 60
                )
                await until(
                    lambda: pid_file.exists() and int(pid_file.read_text()) == old.process.pid,
                    10,
                    what="the pid file to name the running lbd again",
                )
                successor = int(str(failed.get("pid", 0)))
                await until(lambda: _gone(successor), 10, what="the successor to be reaped")
                assert await read_name(ip, port) == "b1"
                code, out, err = await run_cli("reload", "--pid-file", str(pid_file))
                assert code == 0 and str(old.process.pid) in out, err
                await old.wait_event("config reload failed, keeping the running config", 10)
                old.signal(signal.SIGTERM)
                assert await old.wait_exit(30) == 0
        assert not pid_file.exists()


async def test_a_successor_killed_while_it_starts_gives_the_pid_file_back(
    tmp_path: Path,
) -> None:
    async with echo_backend("b1") as (bh, bp, _):
        ip = fresh_ip()
        port = dead_port(ip)
        path = _config(tmp_path, (bh, bp), ip, port)
        pid_file = tmp_path / "lbd.pid"
        async with lbd_process(path, "--pid-file", str(pid_file), "--no-watch") as old:
            await old.wait_event("restart socket listening", timeout=30)
            old.signal(signal.SIGUSR2)
            successor = await _next_pid(pid_file, old.process.pid, 30)
            os.kill(successor, signal.SIGKILL)  # our lbd's child, by PID
            await until(
                lambda: pid_file.exists() and pid_file.read_text() == f"{old.process.pid}\n",
                10,
                what="the pid file to name the running lbd again",
            )
            await until(lambda: _gone(successor), 10, what="the successor to be reaped")
            assert await read_name(ip, port) == "b1"
            last = await restart(old, pid_file)  # and the next restart works
            try:
                assert await read_name(ip, port) == "b1"
            finally:
                _end(last)
