"""Connection mirroring (lbd.net.mirror): the shadow gets every client byte, the real connection
stays byte-exact, and a shadow that stalls, refuses or is missing never slows or breaks it."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import AsyncIterator

from lbd.net.mirror import MIRROR_BUFFER
from tests.support import (
    address_of,
    config,
    dead_port,
    document,
    echo_backend,
    fresh_ip,
    read_name,
    receive_hashed,
    route_of,
    running,
    send_hashed,
    service_yaml,
    stream_backend,
    until,
)

MiB = 1024 * 1024


def mirrored(host: str, port: int, shadow: tuple[str, int], percent: int = 100) -> str:
    extra = f"    mirror: {{endpoint: '{shadow[0]}:{shadow[1]}', percent: {percent}}}\n"
    return document(service_yaml("svc", [(host, port)], extra=extra))


@contextlib.asynccontextmanager
async def sink() -> AsyncIterator[tuple[str, int, dict[str, object]]]:
    """A backend that reads everything to EOF (its hash and size), answers with a few bytes
    of its own, and closes."""
    seen: dict[str, object] = {"connections": 0, "received": 0}
    done = asyncio.Event()
    seen["done"] = done

    def progress(total: int) -> None:
        seen["received"] = total

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["connections"] = int(str(seen["connections"])) + 1
        writer.write(b"shadow says hi\n")
        seen["hash"], seen["size"] = await receive_hashed(reader, progress)
        writer.close()
        done.set()

    async with stream_backend(handler) as (host, port):
        yield host, port, seen


async def test_the_shadow_gets_every_byte_and_the_real_connection_stays_exact() -> None:
    async with sink() as (real_host, real_port, real), sink() as (shadow_host, shadow_port, shadow):
        cfg = config(mirrored(real_host, real_port, (shadow_host, shadow_port)))
        async with running(cfg) as runtime:
            reader, writer = await asyncio.open_connection(*address_of(runtime))
            stats = route_of(runtime).stats
            # A shadow that keeps up gets every byte; one that falls more than the copy's
            # buffer behind is dropped (test_a_stalled_shadow_...). The client waits for the
            # shadow to keep it to the first kind: on a busy machine nothing else couples them.
            sent = await asyncio.wait_for(
                send_hashed(
                    writer,
                    8 * MiB,
                    b"mirror",
                    pace=lambda n: int(str(shadow["received"])) >= n - MIRROR_BUFFER // 2,
                ),
                30,
            )
            assert await asyncio.wait_for(reader.read(), 10) == b"shadow says hi\n"  # the real one
            writer.close()
            await asyncio.wait_for(shadow["done"].wait(), 10)  # type: ignore[attr-defined]
            await until(lambda: stats.mirror_bytes_sent_total == 8 * MiB)
    assert real["hash"] == shadow["hash"] == sent and real["size"] == 8 * MiB
    assert stats.mirror_cx_total == 1 and stats.mirror_cx_failed_total == 0
    assert stats.mirror_bytes_dropped_total == 0
    assert stats.splice_switches_total == 0  # a mirrored direction stays in Python


async def test_a_stalled_shadow_does_not_slow_the_real_flow() -> None:
    """The shadow accepts but never reads: once its buffer is full its copy is dropped
    (counted), and the real 64 MiB transfer runs about as fast as one without a mirror."""
    stalled: set[asyncio.StreamWriter] = set()
    release = asyncio.Event()

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stalled.add(writer)
        await release.wait()
        writer.close()

    async def transfer(runtime_address: tuple[str, int]) -> float:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection(*runtime_address)
        started = loop.time()
        await asyncio.wait_for(send_hashed(writer, 64 * MiB, b"stall"), 60)
        await asyncio.wait_for(reader.read(), 30)
        writer.close()
        return loop.time() - started

    async with sink() as (real_host, real_port, real), stream_backend(never_reads) as shadow:
        plain = config(document(service_yaml("svc", [(real_host, real_port)])))
        async with running(plain) as runtime:
            without = await transfer(address_of(runtime))
        async with running(config(mirrored(real_host, real_port, shadow))) as runtime:
            real["done"] = asyncio.Event()
            took = await transfer(address_of(runtime))
            stats = route_of(runtime).stats
        release.set()
    assert real["size"] == 64 * MiB
    assert stats.mirror_cx_failed_total == 1  # fell behind: its copy ended
    assert stats.mirror_bytes_dropped_total >= 64 * MiB - stats.mirror_bytes_sent_total
    assert stats.mirror_bytes_sent_total <= 64 * MiB - MIRROR_BUFFER
    assert took <= 3 * without + 1.0, (took, without)


async def test_a_missing_shadow_costs_the_real_connection_nothing() -> None:
    shadow_host = fresh_ip()
    async with echo_backend("real") as (host, port, _):
        cfg = config(mirrored(host, port, (shadow_host, dead_port(shadow_host))))
        async with running(cfg) as runtime:
            names = [await read_name(*address_of(runtime)) for _ in range(5)]
            stats = route_of(runtime).stats
            await until(lambda: stats.mirror_cx_failed_total == 5)
    assert names == ["real"] * 5 and stats.mirror_cx_total == 5


async def test_percent_mirrors_that_share_of_the_connections() -> None:
    accepted = 0

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.read()
        writer.close()

    async with echo_backend("real") as (host, port, _), stream_backend(count) as shadow:
        async with running(config(mirrored(host, port, shadow, 50)), random.Random(2)) as runtime:
            for _ in range(400):
                assert await read_name(*address_of(runtime)) == "real"
            stats = route_of(runtime).stats
            await until(lambda: accepted == stats.mirror_cx_total)
    assert abs(stats.mirror_cx_total - 200) <= 4 * math.sqrt(400 * 0.25)
