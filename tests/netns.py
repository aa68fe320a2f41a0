"""Two network namespaces joined by a veth pair, with addresses that exist only inside them
(no route out); root only. Both are deleted afterwards, whatever happened."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import pytest


def can_make_namespaces() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


@contextlib.contextmanager
def joined_namespaces(
    names: tuple[str, str], addresses: tuple[list[str], list[str]]
) -> Iterator[tuple[str, str]]:
    """Namespaces ``lbd<pid><name>`` for both ``names`` (one letter each), with ``addresses``
    (``IP/prefix``) on each one's end of the pair; skips the test where they cannot be made."""
    tag = str(os.getpid() % 100000)
    spaces = (f"lbd{tag}{names[0]}", f"lbd{tag}{names[1]}")
    ends = (f"lv{tag}{names[0]}", f"lv{tag}{names[1]}")
    steps = [
        *(["ip", "netns", "add", ns] for ns in spaces),
        ["ip", "link", "add", ends[0], "type", "veth", "peer", "name", ends[1]],
        *(["ip", "link", "set", end, "netns", ns] for ns, end in zip(spaces, ends, strict=True)),
        *(
            ["ip", "-n", ns, "addr", "add", address, "dev", end]
            for ns, end, mine in zip(spaces, ends, addresses, strict=True)
            for address in mine
        ),
        *(
            ["ip", "-n", ns, "link", "set", dev, "up"]
            for ns, end in zip(spaces, ends, strict=True)
            for dev in ("lo", end)
        ),
    ]
    try:
        for argv in steps:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            if done.returncode != 0:
                pytest.skip(f"no network namespaces here ({' '.join(argv)}: {done.stderr.strip()})")
        yield spaces
    finally:
        # Deleting a namespace deletes its end of the veth pair, and so the pair.
        for ns in spaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@contextlib.asynccontextmanager
async def server_in(namespace: str, code: str) -> AsyncIterator[None]:
    """Python ``code`` running in ``namespace`` until the block ends; it prints ``ready`` once
    it serves. Killed (ours, by PID) at the end."""
    process = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", namespace, sys.executable, "-c", code,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert await asyncio.wait_for(process.stdout.readline(), 10) == b"ready\n"
        yield
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def output_in(namespace: str, code: str, timeout: float = 60) -> list[str]:
    """Run Python ``code`` in ``namespace`` to its end; the lines it printed."""
    process = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", namespace, sys.executable, "-c", code,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode == 0, err.decode()
    return out.decode().splitlines()
