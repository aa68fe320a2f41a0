"""Running lbd as a real process: start it, wait for a log event, signal it, read its logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from lbd.admin.client import AdminTarget


@dataclass
class LbdProcess:
    process: asyncio.subprocess.Process
    events: list[dict[str, object]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    _new_line: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            text = line.decode(errors="replace").rstrip("\n")
            self.lines.append(text)
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(text))
            self._new_line.set()

    async def wait_event(
        self, name: str, timeout: float = 10.0, count: int = 1
    ) -> dict[str, object]:
        """The ``count``-th log event whose message is ``name``; fails after ``timeout``."""

        async def found() -> dict[str, object]:
            while True:
                matches = [e for e in self.events if e.get("event") == name]
                if len(matches) >= count:
                    return matches[count - 1]
                if self.process.returncode is not None and self._reader and self._reader.done():
                    raise AssertionError(f"lbd exited before {name!r}:\n" + "\n".join(self.lines))
                self._new_line.clear()
                await self._new_line.wait()

        try:
            return await asyncio.wait_for(found(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"no {name!r} within {timeout}s:\n" + "\n".join(self.lines)
            ) from None

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    async def wait_exit(self, timeout: float = 10.0) -> int:
        code = await asyncio.wait_for(self.process.wait(), timeout)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, timeout)
        return code

    def listener(self, kind: str = "clusterIP") -> tuple[str, int]:
        for event in self.events:
            if event.get("event") == "listening" and event.get("kind") == kind:
                host, _, port = str(event["listener"]).split(" ", 1)[1].rpartition(":")
                return host.strip("[]"), int(port)
        raise AssertionError(f"no {kind} listener logged")


async def run_cli(*args: str, timeout: float = 30.0) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lbd",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def lbd_process(
    config_path: Path,
    *extra: str,
    max_files: int | None = None,
    wrapper: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> AsyncIterator[LbdProcess]:
    """``max_files`` sets both RLIMIT_NOFILE limits of the child (lbd raises soft to hard).
    ``wrapper`` runs lbd through a command that execs it (``ip netns exec NS``), so the PID
    is still lbd's. ``env`` is added to this process's environment."""

    def limit_files() -> None:
        if max_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

    process = await asyncio.create_subprocess_exec(
        *(wrapper or ()),
        sys.executable,
        "-m",
        "lbd",
        "run",
        str(config_path),
        "--log-format",
        "json",
        *extra,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        preexec_fn=limit_files if max_files is not None else None,
    )
    lbd = LbdProcess(process)
    lbd._reader = asyncio.create_task(lbd._read_stderr())
    try:
        yield lbd
    finally:
        if process.returncode is None:
            process.kill()  # our own child, by PID
            await process.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(lbd._reader, 5)


def alive(pid: int) -> bool:
    """Whether a process (ours, or one our lbd started) still exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def restart(lbd: LbdProcess, pid_file: Path) -> int:
    """``lbd restart``: the successor's pid, once ``lbd`` handed over to it and exited 0."""
    code, _, err = await run_cli("restart", "--pid-file", str(pid_file))
    assert code == 0, err
    await lbd.wait_event("restart: the next lbd serves; draining and exiting", 60)
    assert await asyncio.wait_for(lbd.process.wait(), 30) == 0
    successor = int(pid_file.read_text())
    assert successor != lbd.process.pid and alive(successor)
    return successor


async def metric(target: AdminTarget, name: str, label: str = "") -> float:
    """The sum of every series of ``name`` that lbd's /metrics exports (those with ``label``,
    e.g. ``reason="overflow"``, when given)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(f"http://{target.address}/metrics") as response:
            text = await response.text()
    total = 0.0
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        if not label or label in line.partition("}")[0]:
            total += float(line.rsplit(" ", 1)[1])
    return total
