"""Seamless restart of UDP listeners: clients sending datagrams all along lose none."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.procs import alive, lbd_process, restart
from tests.support import document, fresh_ip, service_yaml, until

pytestmark = pytest.mark.slow

CLIENTS = 8  # distinct addresses: with workers, the kernel spreads them over every socket
INTERVAL_S = 0.002  # per client: ~500 datagrams a second each
MAX_PER_CLIENT = 30_000  # bounds the run: 60 s at the pace above
LATE_S = 3.0  # a reply later than this counts as lost
# The backend answers this late, so that replies are always on their way when the old lbd
# stops reading: they must still reach their clients.
REPLY_DELAY_S = 0.05


def free_udp_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


class SlowEcho(asyncio.DatagramProtocol):
    """Echoes each datagram, prefixed with ``b1 ``, REPLY_DELAY_S later."""

    def __init__(self) -> None:
        self.datagrams = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.datagrams += 1
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        loop.call_later(REPLY_DELAY_S, self.transport.sendto, b"b1 " + data, addr)


@contextlib.asynccontextmanager
async def slow_echo() -> AsyncIterator[tuple[str, int, SlowEcho]]:
    transport, backend = await asyncio.get_running_loop().create_datagram_endpoint(
        SlowEcho, local_addr=(fresh_ip(), 0)
    )
    try:
        host, port = transport.get_extra_info("sockname")[:2]
        yield host, port, backend
    finally:
        transport.close()


class Stream(asyncio.DatagramProtocol):
    """One connected client: numbered datagrams at a steady pace; every reply is recorded."""

    def __init__(self) -> None:
        self.sent = 0
        self.answered: set[int] = set()
        self.wrong: list[bytes] = []
        self.errors: list[str] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        prefix, _, number = data.partition(b" ")
        if prefix != b"b1" or not number.isdigit() or int(number) >= self.sent:
            self.wrong.append(data[:40])
        else:
            self.answered.add(int(number))

    def error_received(self, exc: Exception) -> None:
        self.errors.append(repr(exc))  # e.g. ECONNREFUSED: nothing listened for a moment

    @property
    def missing(self) -> int:
        return self.sent - len(self.answered)


@contextlib.asynccontextmanager
async def streams(target: tuple[str, int]) -> AsyncIterator[list[Stream]]:
    """CLIENTS clients sending until the block ends; then stragglers get LATE_S to arrive."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    opened: list[tuple[asyncio.DatagramTransport, Stream]] = []
    for _ in range(CLIENTS):
        transport, protocol = await loop.create_datagram_endpoint(
            Stream, local_addr=(fresh_ip(), 0), remote_addr=target
        )
        opened.append((transport, protocol))

    async def send(transport: asyncio.DatagramTransport, stream: Stream) -> None:
        for number in range(MAX_PER_CLIENT):
            if stop.is_set():
                return
            stream.sent = number + 1
            transport.sendto(b"%d" % number)
            await asyncio.sleep(INTERVAL_S)

    tasks = [asyncio.create_task(send(t, s)) for t, s in opened]
    try:
        yield [s for _, s in opened]
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        with contextlib.suppress(AssertionError):
            await until(lambda: all(s.missing == 0 for _, s in opened), LATE_S)
        for transport, _ in opened:
            transport.close()


@pytest.mark.parametrize("workers", [1, 2])
async def test_restart_hands_udp_listeners_over_and_loses_no_datagram(
    tmp_path: Path, workers: int
) -> None:
    async with slow_echo() as (bh, bp, backend):
        ip = fresh_ip()
        port = free_udp_port(ip)
        service = service_yaml("dns", [(bh, bp)], cluster_ip=ip, port=port, protocol="UDP")
        text = document(service, defaults="{udpIdleTimeout: 1s, drainTimeout: 10s}")
        path = tmp_path / "lbd.yaml"
        path.write_text(
            text.replace("apiVersion: lbd/v1\n", f"apiVersion: lbd/v1\nworkers: {workers}\n")
        )
        pid_file = tmp_path / "lbd.pid"
        successor = 0
        async with lbd_process(path, "--pid-file", str(pid_file)) as old:
            await old.wait_event("restart socket listening", timeout=30)
            try:
                async with streams((ip, port)) as clients:
                    await until(lambda: all(len(c.answered) >= 50 for c in clients), 20)
                    successor = await restart(old, pid_file)
                    after = [len(c.answered) for c in clients]
                    await until(
                        lambda: all(
                            len(c.answered) >= n + 200 for c, n in zip(clients, after, strict=True)
                        ),
                        20,
                    )
            finally:
                if not successor:
                    with contextlib.suppress(OSError, ValueError):
                        successor = int(pid_file.read_text())
                if successor and successor != old.process.pid and alive(successor):
                    os.kill(successor, signal.SIGTERM)  # started by our lbd, by its PID
                    await until(lambda: not alive(successor), 20)
            sent = sum(c.sent for c in clients)
            lost = sum(c.missing for c in clients)
            assert [c.wrong for c in clients] == [[]] * CLIENTS
            assert [c.errors for c in clients] == [[]] * CLIENTS
            assert lost == 0, f"{lost} of {sent} datagrams unanswered"
            assert backend.datagrams >= sent
