"""Seamless restart: ``lbd restart`` under a loop of short connections refuses none."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
from pathlib import Path

import pytest

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
                code, _, err = await run_cli("restart", "--pid-file", str(pid_file))
                assert code == 0, err
                await old.wait_event("restart: the next lbd serves; draining and exiting", 60)
                assert await asyncio.wait_for(old.process.wait(), 30) == 0
                successor = int(pid_file.read_text())
                assert successor != old.process.pid and alive(successor)
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
