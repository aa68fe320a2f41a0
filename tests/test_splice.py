"""Bulk directions move to splice(2) (lbd.net.splice); small messages stay on the copy path."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import select
import socket
import struct

import pytest

from lbd.net import splice
from tests.support import (
    address_of,
    bulk_exchange,
    config,
    document,
    fresh_ip,
    receive_hashed,
    route_of,
    running,
    send_hashed,
    service_yaml,
    stream_backend,
    until,
)

MiB = 1024 * 1024
BULK = 256 * 1024  # writes big enough to arrive as bulk reads
pytestmark = pytest.mark.skipif(not splice.SPLICE_AVAILABLE, reason="os.splice needs Linux")


def _block(seed: bytes) -> bytes:
    return hashlib.sha256(seed).digest() * (256 * 1024 // 32)


async def _exchange(up: int, down: int, extra: str = "") -> tuple[int, int]:
    stats = await bulk_exchange(up, down, extra, block_size=BULK)
    return stats.splice_switches_total, stats.splice_bytes_total


async def test_bulk_each_way_moves_by_splice_byte_exact() -> None:
    switches, spliced = await _exchange(48 * MiB, 48 * MiB)
    assert switches == 2
    assert spliced > 80 * MiB  # all but the first bulk reads of each direction


async def test_bulk_upload_splices_only_that_direction() -> None:
    switches, spliced = await _exchange(32 * MiB, 100)
    assert switches == 1 and spliced > 28 * MiB


async def test_splice_off_keeps_every_direction_on_the_copy_path() -> None:
    assert await _exchange(16 * MiB, 16 * MiB, extra="    splice: off\n") == (0, 0)


async def test_small_messages_stay_on_the_copy_path() -> None:
    switches, spliced = await _exchange(60_000, 60_000)
    assert (switches, spliced) == (0, 0)


async def test_no_pipe_left_falls_back_to_copying(monkeypatch: pytest.MonkeyPatch) -> None:
    class Exhausted(splice.PipePool):
        def get(self) -> tuple[int, int]:
            raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(splice, "PIPES", Exhausted())
    results: dict[str, int] = {}

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        results["received"] = (await receive_hashed(reader))[1]
        writer.close()

    async with stream_backend(backend) as (bh, bp):
        cfg = config(document(service_yaml("svc", [(bh, bp)])))
        async with running(cfg) as runtime:
            reader, writer = await asyncio.open_connection(*address_of(runtime))
            await asyncio.wait_for(send_hashed(writer, 16 * MiB, b"x", BULK), 30)
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            stats = route_of(runtime).stats
            assert stats.splice_switches_total == 0 and stats.splice_fallbacks_total >= 1
    assert results["received"] == 16 * MiB


async def test_spliced_direction_keeps_backpressure_bounded() -> None:
    """A client that stops reading: the backend can push only what the kernel buffers hold
    (socket buffers and one pipe), never an unbounded amount."""
    pushed = 0
    stuck = asyncio.Event()

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal pushed
        block = _block(b"f")
        try:
            for _ in range(1024):  # at most 256 MiB
                writer.write(block)
                try:
                    await asyncio.wait_for(writer.drain(), 0.5)
                except TimeoutError:
                    stuck.set()
                    return
                pushed += len(block)
        finally:
            writer.transport.abort()

    async with stream_backend(firehose) as (bh, bp):
        cfg = config(document(service_yaml("svc", [(bh, bp)])))
        async with running(cfg) as runtime:
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
                sock.setblocking(False)
                loop = asyncio.get_running_loop()
                await loop.sock_connect(sock, address_of(runtime))
                # Read a few MiB so the direction goes bulk, then stop reading.
                got = 0
                while got < 4 * MiB:
                    got += len(await asyncio.wait_for(loop.sock_recv(sock, MiB), 5))
                await asyncio.wait_for(stuck.wait(), 30)
                assert route_of(runtime).stats.splice_switches_total == 1
    # Socket buffers on both hops (a few MiB at most with autotuning) plus one 256 KiB pipe.
    assert pushed - got < 32 * MiB, pushed - got


@pytest.mark.parametrize("who", ["backend", "client"])
async def test_reset_mid_splice_reaches_the_other_side(who: str) -> None:
    loop = asyncio.get_running_loop()
    spliced = asyncio.Event()
    backend_lost: asyncio.Future[BaseException] = loop.create_future()

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(32):  # 8 MiB: the client reads 4 of it before anyone resets
                writer.write(_block(b"b"))
            await writer.drain()
            await asyncio.wait_for(spliced.wait(), 10)
            if who == "backend":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            await asyncio.wait_for(reader.read(), 10)  # the client sends nothing: EOF or reset
        except ConnectionError as error:
            backend_lost.set_result(error)
        finally:
            writer.transport.abort()

    async with stream_backend(backend) as (bh, bp):
        cfg = config(document(service_yaml("svc", [(bh, bp)])))
        async with running(cfg) as runtime:
            with socket.create_connection(address_of(runtime)) as sock:
                sock.setblocking(False)
                got = 0
                while got < 4 * MiB:
                    got += len(await asyncio.wait_for(loop.sock_recv(sock, MiB), 5))
                assert route_of(runtime).stats.splice_switches_total == 1
                spliced.set()
                if who == "client":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
                    assert isinstance(await asyncio.wait_for(backend_lost, 10), ConnectionError)
                else:
                    with pytest.raises(ConnectionResetError):
                        await _read_to_the_end(loop, sock)
            await until(lambda: not runtime.connections, 20)


async def _read_to_the_end(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    while await asyncio.wait_for(loop.sock_recv(sock, MiB), 10):
        pass


class _PumpOutcome:
    """A pump's owner that records how the pump ended."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.moved = 0
        self.failure: asyncio.Future[tuple[bool, int | None]] = loop.create_future()

    def pumped(self, upward: bool, count: int) -> None:
        self.moved += count

    def pump_ended(self, upward: bool) -> None:
        self.failure.set_exception(AssertionError("the reset source read as a clean EOF"))

    def pump_failed(self, upward: bool, at_source: bool, error: OSError) -> None:
        self.failure.set_result((at_source, error.errno))


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server((fresh_ip(), 0)) as server:
        near = socket.create_connection(server.getsockname())
        far, _ = server.accept()
    near.setblocking(False)
    return near, far


def _poll_events(sock: socket.socket) -> int:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return sum(events for _, events in poller.poll(0))


async def test_a_reset_source_with_bytes_queued_is_drained_then_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvloop reports a socket error (POLLERR) to a reader once and then drops that reader, so
    the pump must not wait for another wakeup after a full round: the queued bytes reach the
    destination and the reset is reported, on both loops."""
    monkeypatch.setattr(splice, "ROUNDS_PER_EVENT", 1)  # one round per wakeup, as at 1 MiB
    loop = asyncio.get_running_loop()
    source, sender = _tcp_pair()
    destination, reader = _tcp_pair()
    payload = _block(b"queued")[:32768]
    with source, sender, destination, reader:
        sender.sendall(payload)
        await until(lambda: _poll_events(source) & select.POLLIN != 0, what="bytes queued")
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sender.close()  # RST: the source now holds 32 KiB and an error
        await until(lambda: _poll_events(source) & select.POLLERR != 0, what="the reset")
        owner = _PumpOutcome(loop)
        pump = splice.SplicePump(loop, source.fileno(), destination.fileno(), owner, False)
        try:
            at_source, code = await asyncio.wait_for(owner.failure, 5)
        finally:
            pump.close()
        assert (at_source, code) == (True, errno.ECONNRESET)
        assert owner.moved == len(payload)
        reader.settimeout(5)
        got = b""
        while len(got) < len(payload):
            got += reader.recv(len(payload))
        assert got == payload


def test_pipe_pool_reuses_empty_pipes_and_closes_dirty_ones() -> None:
    pool = splice.PipePool(size=65536)
    pipe = pool.get()
    pool.put(pipe, empty=True)
    assert pool.get() == pipe
    os.write(pipe[1], b"left over")
    pool.put(pipe, empty=False)
    assert pool.idle == 0
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(pipe[0])
