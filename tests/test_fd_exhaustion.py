"""At the descriptor limit lbd keeps running, does not spin, sheds and recovers (a real
process with a low RLIMIT_NOFILE)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
from pathlib import Path

import aiohttp
import pytest

from lbd.admin.client import AdminTarget
from lbd.process.worker import raise_file_limit
from tests.procs import lbd_process, metric
from tests.support import document, echo_backend, fresh_ip, service_yaml, until

pytestmark = pytest.mark.slow

MAX_FILES = 64
REFUSED = "lbd_downstream_cx_refused_total"
FD_EXHAUSTED = 'reason="fd_exhausted"'


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


async def served_or_reset(reader: asyncio.StreamReader, timeout: float) -> str:
    """What a client that got through connect() sees: the backend's name ("served"), a reset
    or an end of stream ("shed"), or nothing within ``timeout`` ("waiting")."""
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError:
        return "waiting"
    except OSError:
        return "shed"
    return "served" if line == b"b\n" else "shed"


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
            # Once lbd has taken them all in (served, or reset for lack of a descriptor), the
            # served ones hold every descriptor it has.
            outcomes = await asyncio.gather(*(served_or_reset(r, 2.0) for r, _ in held))
            assert "waiting" not in outcomes and "served" in outcomes, outcomes
            # At the limit: new connections fail cleanly, and lbd does not spin meanwhile.
            before = cpu_seconds(lbd.process.pid)
            # Held open together: lbd may have room for one more, not for three.
            tries = [await asyncio.wait_for(asyncio.open_connection(host, port), 1) for _ in "abc"]
            outcomes = await asyncio.gather(*(served_or_reset(r, 0.5) for r, _ in tries))
            answered = [outcome == "served" for outcome in outcomes]
            for _, writer in tries:
                writer.close()
            await asyncio.sleep(1.0)
            busy = cpu_seconds(lbd.process.pid) - before
            assert not all(answered)
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


async def test_every_connection_shed_at_the_limit_fails_at_once_and_is_counted(
    tmp_path: Path,
) -> None:
    """Connections the kernel queued while lbd had no descriptor are reset at once (not left
    to hang until the client's timeout) and each one is counted as fd_exhausted."""
    async with echo_backend("b") as (bh, bp, _):
        path = tmp_path / "lbd.yaml"
        path.write_text(document(service_yaml("svc", [(bh, bp)], cluster_ip=fresh_ip())))
        async with lbd_process(path, max_files=MAX_FILES) as lbd:
            started = await lbd.wait_event("lbd started")
            admin = AdminTarget(address=str(started["admin"]))
            host, port = lbd.listener()
            before = await metric(admin, REFUSED, FD_EXHAUSTED)
            clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
            gave_up = 0  # clients whose connect() failed: lbd may reset theirs too, later
            for _ in range(MAX_FILES + 40):  # lbd can serve about half of MAX_FILES
                try:
                    clients.append(await asyncio.wait_for(asyncio.open_connection(host, port), 1))
                except (OSError, TimeoutError):
                    gave_up += 1
            outcomes = await asyncio.gather(*(served_or_reset(r, 2.0) for r, _ in clients))
            for _, writer in clients:
                writer.close()
            assert outcomes.count("waiting") == 0, outcomes
            shed = outcomes.count("shed")
            assert shed >= 40 and outcomes.count("served") >= 10, outcomes

            # The admin API had no descriptor either while the clients were held: ask now.
            async def all_counted() -> bool:
                with contextlib.suppress(OSError, aiohttp.ClientError):
                    return await metric(admin, REFUSED, FD_EXHAUSTED) >= before + shed
                return False

            await until(all_counted, what="every shed connection counted")
            counted = await metric(admin, REFUSED, FD_EXHAUSTED) - before
            assert shed <= counted <= shed + gave_up
