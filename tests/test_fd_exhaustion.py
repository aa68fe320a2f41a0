"""At the descriptor limit lbd keeps running, does not spin, sheds and recovers (a real
process with a low RLIMIT_NOFILE)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
from pathlib import Path

import pytest

from lbd.process.worker import raise_file_limit
from tests.procs import lbd_process
from tests.support import document, echo_backend, fresh_ip, service_yaml

pytestmark = pytest.mark.slow

MAX_FILES = 64


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def try_echo(host: str, port: int, timeout: float = 1.0) -> bool:
    """One short connection through lbd: True if the backend's name came back."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    try:
        return await asyncio.wait_for(reader.readline(), timeout) == b"b\n"
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_descriptor_exhaustion_sheds_without_spinning_and_recovers(
    tmp_path: Path, loop: str
) -> None:
    async with echo_backend("b") as (bh, bp, _):
        path = tmp_path / "lbd.yaml"
        path.write_text(document(service_yaml("svc", [(bh, bp)], cluster_ip=fresh_ip())))
        async with lbd_process(path, "--loop", loop, max_files=MAX_FILES) as lbd:
            await lbd.wait_event("lbd started")
            host, port = lbd.listener()
            assert await try_echo(host, port)
            # Each proxied connection holds two descriptors in lbd: hold more than it has.
            held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
            for _ in range(MAX_FILES):
                with contextlib.suppress(OSError, TimeoutError):
                    held.append(await asyncio.wait_for(asyncio.open_connection(host, port), 1.0))
            assert len(held) >= MAX_FILES // 2 - 8  # what lbd could take before the limit
            # At the limit: new connections fail cleanly, and lbd does not spin meanwhile.
            before = cpu_seconds(lbd.process.pid)
            shed = [await try_echo(host, port, timeout=0.5) for _ in range(3)]
            await asyncio.sleep(1.0)
            busy = cpu_seconds(lbd.process.pid) - before
            assert not all(shed)
            assert busy < 0.5, f"lbd used {busy:.2f}s of CPU in ~2.5s at the limit"
            for _, writer in held:
                writer.close()
            # Descriptors free up: served again within a second (uvloop: at once; asyncio pauses
            # accepting for 1 s after EMFILE), plus a margin for a loaded machine.
            bound = 1.5 if loop == "uvloop" else 2.5
            loop_ = asyncio.get_running_loop()
            start = loop_.time()
            while not await try_echo(host, port, timeout=0.5):
                assert loop_.time() - start < bound, "not recovered"
            recovered = loop_.time() - start
            assert lbd.process.returncode is None
            assert recovered < bound


def test_soft_descriptor_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))
    try:
        assert raise_file_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
