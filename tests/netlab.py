"""Network namespaces for tests: hosts, links and processes that exist only for one test.

Every name carries this test process's PID (``lbt<pid>-<host>``), so runs side by side never
meet, and a run that was killed before its cleanup is recognised later by its dead PID and
removed then (its namespaces and the processes still inside them). Nothing is ever added to the
root namespace: a veth pair is created there for an instant and both ends are moved into test
namespaces at once (an end that is moved cannot stay behind; a pair whose move failed is
deleted). Root only: callers skip otherwise (``NETNS_SKIP``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
PREFIX = "lbt"
_NAME = re.compile(rf"^{PREFIX}(\d+)-[a-z0-9]+$")
NETNS_SKIP = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="network namespaces need root and ip (iproute2); CI runs as root",
)


def run(argv: Sequence[str], timeout: float = 10, check: bool = True) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(namespace: str) -> None:
    """Kill what still runs inside ``namespace`` (processes a test started there), delete it."""
    pids = run(["ip", "netns", "pids", namespace], check=False).split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    run(["ip", "netns", "del", namespace], check=False)


def remove_stale() -> None:
    """Namespaces left by test runs that died before cleaning up (their PID is gone)."""
    for line in run(["ip", "netns", "list"], check=False).splitlines():
        name = line.split(" ", 1)[0]
        match = _NAME.match(name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            _remove(name)


@dataclass
class Lab:
    """The namespaces of one test. ``host(name)`` creates one; ``close`` removes them all."""

    tag: str = field(default_factory=lambda: str(os.getpid()))
    hosts: list[str] = field(default_factory=list)
    _links: int = 0

    def ns(self, host: str) -> str:
        return f"{PREFIX}{self.tag}-{host}"

    def host(self, name: str) -> str:
        namespace = self.ns(name)
        _remove(namespace)  # a leftover of an earlier test of this same run
        run(["ip", "netns", "add", namespace])
        self.hosts.append(namespace)
        self.ip(name, "link", "set", "lo", "up")
        return namespace

    def ip(self, host: str, *argv: str) -> str:
        return run(["ip", "-n", self.ns(host), *argv])

    def exec(self, host: str, *argv: str) -> list[str]:
        """A command line that runs ``argv`` inside ``host`` (the PID stays the command's)."""
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def sysctl(self, host: str, key: str, value: str) -> None:
        run(self.exec(host, "sysctl", "-q", "-w", f"{key}={value}"))

    def read_sysctl(self, host: str, key: str) -> str:
        return run(self.exec(host, "sysctl", "-n", key)).strip()

    def link(self, a: str, b: str) -> tuple[str, str]:
        """A veth pair between hosts ``a`` and ``b``, both ends up; returns the two names."""
        self._links += 1
        end_a, end_b = f"v{self.tag}{self._links}a", f"v{self.tag}{self._links}b"
        run(["ip", "link", "add", end_a, "type", "veth", "peer", "name", end_b])
        try:
            run(["ip", "link", "set", end_a, "netns", self.ns(a)])
            run(["ip", "link", "set", end_b, "netns", self.ns(b)])
        except RuntimeError:
            # Still in the root namespace: delete it there (one end takes the pair with it).
            run(["ip", "link", "del", end_a], check=False)
            run(["ip", "link", "del", end_b], check=False)
            raise
        self.ip(a, "link", "set", end_a, "up")
        self.ip(b, "link", "set", end_b, "up")
        return end_a, end_b

    def close(self) -> None:
        for namespace in reversed(self.hosts):
            _remove(namespace)
        self.hosts.clear()


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    """A Lab that is removed on the way out, however the test ends (failure, Ctrl-C)."""
    remove_stale()
    created = Lab()
    try:
        yield created
    finally:
        created.close()


async def ask(
    lab: Lab,
    host: str,
    requests: list[dict[str, Any]],
    *,
    concurrency: int = 32,
    timeout: float = 2.0,
) -> list[dict[str, str]]:
    """Run ``requests`` from ``host`` with tests/netclient.py; one result per request."""
    spec = {"requests": requests, "concurrency": concurrency, "timeout": timeout}
    client = await asyncio.create_subprocess_exec(
        *lab.exec(host, sys.executable, str(HERE / "netclient.py")),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        deadline = 30 + timeout * len(requests) / concurrency
        out, err = await asyncio.wait_for(client.communicate(json.dumps(spec).encode()), deadline)
    finally:
        if client.returncode is None:
            client.kill()  # ours, by PID
            await client.wait()
    assert client.returncode == 0, err.decode()
    results: list[dict[str, str]] = json.loads(out)
    return results


def replies(results: list[dict[str, str]]) -> list[str]:
    return [r.get("reply") or r.get("error", "?") for r in results]


@contextlib.asynccontextmanager
async def backend(lab: Lab, host: str, *sockets: str) -> AsyncIterator[None]:
    """tests/netbackend.py in ``host``, serving ``sockets`` (``tcp:ADDR:PORT``...)."""
    process = await asyncio.create_subprocess_exec(
        *lab.exec(host, sys.executable, str(HERE / "netbackend.py"), *sockets),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        assert await asyncio.wait_for(process.stdout.readline(), 10) == b"ready\n"
        yield
    finally:
        if process.returncode is None:
            process.kill()  # ours, by PID
        await process.wait()
