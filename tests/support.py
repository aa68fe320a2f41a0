"""Test helpers: fresh 127.x addresses, real backends on port 0, an in-process lbd."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import inspect
import itertools
import os
import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lbd.admin.client import AdminTarget
from lbd.admin.server import AdminServer, ReloadHook
from lbd.config import Config, load_text
from lbd.endpoints.route import Route
from lbd.observability.stats import EndpointStats, RouteStats
from lbd.runtime.runtime import Runtime

_addresses = itertools.count(1)
# One /16 per test process, so two suites running at once on a machine do not collide.
_BLOCK = 100 + os.getpid() % 100


def fresh_ip() -> str:
    """A 127.x address no other test in this process uses (every 127.x is local)."""
    n = next(_addresses)
    return f"127.{_BLOCK}.{n // 250}.{n % 250 + 1}"


def dead_port(address: str) -> int:
    """A port on ``address`` with nothing listening: connects to it are refused."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def lbd_command(argv: list[str]) -> argparse.Namespace:
    """A command line that runs lbd (its first word is the ``lbd`` program), as ``lbd`` would
    read it: argparse's error (SystemExit) if lbd would refuse it."""
    from lbd.cli import build_parser

    assert Path(argv[0]).name == "lbd", argv
    return build_parser().parse_args(argv[1:])


def config(yaml_text: str) -> Config:
    return load_text(yaml_text, "<test>")


def service_yaml(
    name: str,
    endpoints: list[tuple[str, int]],
    *,
    cluster_ip: str | None = None,
    strategy: str = "round-robin",
    extra: str = "",
    port: int = 0,
    protocol: str = "TCP",
) -> str:
    """One ClusterIP service on port 0 (the kernel picks) with numeric-port endpoints."""
    eps = "".join(f"      - {{address: '{a}', ports: {{p: {p}}}}}\n" for a, p in endpoints)
    return (
        f"  - name: {name}\n"
        f"    clusterIP: '{cluster_ip or fresh_ip()}'\n"
        f"    strategy: {strategy}\n"
        f"    ports: [{{port: {port}, targetPort: p, protocol: {protocol}}}]\n"
        + (f"    endpoints:\n{eps}" if endpoints else "    endpoints: []\n")
        + extra
    )


def document(*services: str, defaults: str = "", node: str = "", admin: str = "") -> str:
    """A config; its admin API (if something starts it) is on a fresh 127.x address, port 0,
    never on the shared default 127.0.0.1:9180."""
    return (
        "apiVersion: lbd/v1\n"
        + (f"node: {node}\n" if node else "")
        + (f"defaults: {defaults}\n" if defaults else "")
        + f"admin: {admin or f'{{address: {fresh_ip()}:0}}'}\n"
        + "services:\n"
        + "".join(services)
    )


@contextlib.asynccontextmanager
async def running(cfg: Config, rng: random.Random | None = None) -> AsyncIterator[Runtime]:
    """An lbd runtime serving ``cfg`` in this loop (``rng``: its injected randomness); always
    torn down."""
    runtime = Runtime(cfg, rng)
    await runtime.start()
    try:
        yield runtime
    finally:
        runtime.stop_accepting()
        runtime.close_all("test_teardown")
        await runtime.health.wait_closed()
        await settle()


def upstream_totals(route: Route) -> EndpointStats:
    """The counters of every endpoint of ``route`` (present and draining), summed."""
    total = EndpointStats()
    for endpoint in (*route.pool.members, *route.pool.draining):
        for name in ("upstream_cx_total", "upstream_cx_connect_fail_total"):
            setattr(total, name, getattr(total, name) + getattr(endpoint.stats, name))
        total.upstream_cx_connect_timeout_total += endpoint.stats.upstream_cx_connect_timeout_total
    return total


def route_of(runtime: Runtime) -> Route:
    """The only service port's live route."""
    [route] = runtime.routes.values()
    return route


def address_of(
    runtime: Runtime, service: str = "default/svc", kind: str = "clusterIP"
) -> tuple[str, int]:
    return runtime.listener_for(service, 0, kind).bound


# -- backends -------------------------------------------------------------------------------


@dataclass
class BackendStats:
    connections: int = 0
    open: int = 0
    received: int = 0
    resets: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    transports: set[asyncio.BaseTransport] = field(default_factory=set)


class NamedEcho(asyncio.Protocol):
    """Says its name on connect, echoes what it gets, and half-closes after the client does."""

    def __init__(self, name: str, stats: BackendStats) -> None:
        self.name = name
        self.stats = stats
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.stats.connections += 1
        self.stats.open += 1
        self.stats.transports.add(transport)
        if self.name:
            self.transport.write(f"{self.name}\n".encode())  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.stats.received += len(data)
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> bool:
        assert self.transport is not None
        self.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.open -= 1
        if self.transport is not None:
            self.stats.transports.discard(self.transport)
        if isinstance(exc, ConnectionResetError):
            self.stats.resets += 1
        self.stats.closed.set()


@contextlib.asynccontextmanager
async def echo_backend(
    name: str = "", address: str | None = None
) -> AsyncIterator[tuple[str, int, BackendStats]]:
    loop = asyncio.get_running_loop()
    stats = BackendStats()
    host = address or fresh_ip()
    server = await loop.create_server(lambda: NamedEcho(name, stats), host, 0)
    try:
        yield host, server.sockets[0].getsockname()[1], stats
    finally:
        server.close()
        await close_transports(stats.transports)


async def close_transports(transports: set[asyncio.BaseTransport]) -> None:
    """Let connections that are finishing finish, then abort the rest, so no transport
    outlives its test (warnings are errors)."""
    with contextlib.suppress(AssertionError):  # what has not finished by then is aborted
        await until(lambda: not transports, 0.5)
    for transport in list(transports):
        transport.abort()  # type: ignore[attr-defined]
    await settle()


async def settle() -> None:
    """A few loop turns: closing a transport completes on a later iteration."""
    for _ in range(3):
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def echo_backends(count: int) -> AsyncIterator[list[tuple[str, int, BackendStats]]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(echo_backend(f"backend-{i}")) for i in range(count)]


async def read_name(host: str, port: int, timeout: float = 5.0) -> str:
    """Connect, read the backend's name line, close."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return line.decode().strip()


@contextlib.contextmanager
def listening_socket(address: str, backlog: int) -> Iterator[socket.socket]:
    sock = socket.socket()
    try:
        sock.bind((address, 0))
        sock.listen(backlog)
        yield sock
    finally:
        sock.close()


# -- UDP ----------------------------------------------------------------------------------------


@dataclass
class UdpBackendStats:
    datagrams: int = 0
    peers: list[tuple[str, int]] = field(default_factory=list)  # distinct, in order of arrival


class UdpEcho(asyncio.DatagramProtocol):
    """Echoes each datagram; with a name, prefixes the reply with ``name`` and a space."""

    def __init__(self, name: str, stats: UdpBackendStats) -> None:
        self.prefix = f"{name} ".encode() if name else b""
        self.stats = stats
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.stats.datagrams += 1
        if addr not in self.stats.peers:
            self.stats.peers.append(addr)
        assert self.transport is not None
        self.transport.sendto(self.prefix + data, addr)


@contextlib.asynccontextmanager
async def udp_echo_backend(
    name: str = "", address: str | None = None
) -> AsyncIterator[tuple[str, int, UdpBackendStats]]:
    loop = asyncio.get_running_loop()
    stats = UdpBackendStats()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: UdpEcho(name, stats), local_addr=(address or fresh_ip(), 0)
    )
    try:
        host, port = transport.get_extra_info("sockname")[:2]
        yield host, port, stats
    finally:
        transport.close()
        await settle()


@contextlib.asynccontextmanager
async def udp_echo_backends(count: int) -> AsyncIterator[list[tuple[str, int, UdpBackendStats]]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(udp_echo_backend(f"backend-{i}")) for i in range(count)
        ]


class UdpClientProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes | Exception] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        self.received.put_nowait(exc)


class UdpClient:
    """A *connected* UDP client socket: it accepts only datagrams from the address it sent to,
    and receives that address's ICMP errors (ECONNREFUSED) as exceptions from ``recv``."""

    def __init__(self, transport: asyncio.DatagramTransport, protocol: UdpClientProtocol) -> None:
        self.transport = transport
        self.protocol = protocol

    @property
    def local(self) -> tuple[str, int]:
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    def send(self, data: bytes) -> None:
        self.transport.sendto(data)

    async def recv(self, timeout: float = 5.0) -> bytes:
        item = await asyncio.wait_for(self.protocol.received.get(), timeout)
        if isinstance(item, Exception):
            raise item
        return item

    async def ask(self, data: bytes, timeout: float = 5.0) -> bytes:
        self.send(data)
        return await self.recv(timeout)


@contextlib.asynccontextmanager
async def udp_client(
    target: tuple[str, int], local_ip: str | None = None
) -> AsyncIterator[UdpClient]:
    loop = asyncio.get_running_loop()
    local = local_ip or fresh_ip()
    family = socket.AF_INET6 if ":" in local else socket.AF_INET
    transport, protocol = await loop.create_datagram_endpoint(
        UdpClientProtocol, local_addr=(local, 0), remote_addr=target, family=family
    )
    try:
        yield UdpClient(transport, protocol)
    finally:
        transport.close()
        await settle()


@contextlib.asynccontextmanager
async def admin_running(
    cfg: Config, reload: ReloadHook | None = None
) -> AsyncIterator[tuple[Runtime, AdminTarget]]:
    """An lbd runtime plus its admin API (on the config's fresh 127.x address or socket)."""
    async with running(cfg) as runtime:
        admin = AdminServer(cfg.admin, runtime, reload)
        await admin.start()
        try:
            target = (
                AdminTarget(socket=cfg.admin.socket)
                if cfg.admin.socket
                else AdminTarget(address=admin.bound)
            )
            yield runtime, target
        finally:
            await admin.stop()


async def until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 5.0,
    step: float = 0.005,
    what: str = "",
) -> float:
    """Wait until ``predicate()`` holds (checked every ``step``; it may be a coroutine
    function, e.g. a scrape); returns the seconds it took. The one wait for lbd state with no
    event to wait on: a counter, a checker's verdict reaching a pool, another process's
    metrics. Fails the test with ``what`` after ``timeout``."""
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def holds() -> bool:
        verdict = predicate()
        return bool(await verdict) if inspect.isawaitable(verdict) else bool(verdict)

    try:
        async with asyncio.timeout(timeout):
            # Polling on purpose: the state has no event (see the docstring).
            while not await holds():  # noqa: ASYNC110
                await asyncio.sleep(step)
    except TimeoutError:
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what or predicate}"
        ) from None
    return loop.time() - start


StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def stream_backend(handler: StreamHandler) -> AsyncIterator[tuple[str, int]]:
    """A streams backend (``asyncio.start_server``) on a fresh 127.x address, port 0."""
    server = await asyncio.start_server(handler, fresh_ip(), 0)
    try:
        host, port = server.sockets[0].getsockname()[:2]
        yield host, port
    finally:
        server.close()


@contextlib.asynccontextmanager
async def tcp_server(
    factory: Callable[[], asyncio.Protocol], host: str | None = None, port: int = 0
) -> AsyncIterator[tuple[str, int, asyncio.Server]]:
    """A server of ``factory`` protocols on port 0 (or ``port``); closed at the end."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, host or fresh_ip(), port)
    try:
        yield server.sockets[0].getsockname()[0], server.sockets[0].getsockname()[1], server
    finally:
        server.close()
        await settle()


# -- bulk transfers ---------------------------------------------------------------------------


async def send_hashed(
    writer: asyncio.StreamWriter,
    total: int,
    seed: bytes,
    block_size: int = 65536,
    pace: Callable[[int], bool] | None = None,
) -> str:
    """Write ``total`` bytes in ``block_size`` writes, each starting with its offset (so a
    reordered or repeated block changes the hash), then FIN; returns their SHA-256. ``pace``:
    after each block, wait until ``pace(bytes sent so far)`` holds."""
    digest = hashlib.sha256()
    block = hashlib.sha256(seed).digest() * (block_size // 32)
    sent = 0
    while sent < total:
        chunk = (struct.pack("!Q", sent) + block[8:])[: total - sent]
        digest.update(chunk)
        writer.write(chunk)
        await writer.drain()
        sent += len(chunk)
        if pace is not None:
            await until(functools.partial(pace, sent))
    writer.write_eof()
    return digest.hexdigest()


async def receive_hashed(
    reader: asyncio.StreamReader, progress: Callable[[int], None] | None = None
) -> tuple[str, int]:
    """Read to EOF: (SHA-256, byte count). ``progress(bytes so far)`` after each read."""
    digest = hashlib.sha256()
    total = 0
    while chunk := await reader.read(1024 * 1024):
        digest.update(chunk)
        total += len(chunk)
        if progress is not None:
            progress(total)
    return digest.hexdigest(), total


async def bulk_exchange(up: int, down: int, extra: str = "", block_size: int = 65536) -> RouteStats:
    """Through a fresh lbd: ``up`` bytes client→backend and ``down`` bytes back at the same
    time, each direction half-closed when done; checks both arrive byte-exact and counted,
    and returns the route's counters once the connection has ended."""
    results: dict[str, object] = {}
    done = asyncio.Event()

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent, received = await asyncio.gather(
            send_hashed(writer, down, b"down", block_size), receive_hashed(reader)
        )
        results.update(backend_sent=sent, backend_received=received)
        writer.close()
        done.set()

    async with stream_backend(backend) as (bh, bp):
        async with running(config(document(service_yaml("svc", [(bh, bp)], extra=extra)))) as rt:
            reader, writer = await asyncio.open_connection(*address_of(rt))
            sent, received = await asyncio.wait_for(
                asyncio.gather(send_hashed(writer, up, b"up", block_size), receive_hashed(reader)),
                60,
            )
            await asyncio.wait_for(done.wait(), 10)
            writer.close()
            stats = route_of(rt).stats
            await until(lambda: not rt.connections, 20)
            assert (
                stats.downstream_bytes_received_total == up
                and stats.downstream_bytes_sent_total == down
            )
    assert received == (results["backend_sent"], down)
    assert results["backend_received"] == (sent, up)
    return stats
