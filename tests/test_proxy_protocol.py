"""PROXY protocol v1/v2: exact bytes, the parser (with a hypothesis fuzz), and lbd sending
and accepting headers, trusting them only from acceptProxyProtocolFrom."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbd.net.proxy_protocol import (
    MAX_HEADER,
    NEED_MORE,
    V2_SIGNATURE,
    ProxyHeaderError,
    build_v1,
    build_v2,
    parse,
)
from tests.support import (
    address_of,
    config,
    document,
    fresh_ip,
    route_of,
    running,
    service_yaml,
    tcp_server,
    until,
    upstream_totals,
)

# -- pure ----------------------------------------------------------------------------------------


def test_v1_bytes() -> None:
    assert (
        build_v1(("127.9.0.1", 5000), ("127.9.0.2", 80))
        == b"PROXY TCP4 127.9.0.1 127.9.0.2 5000 80\r\n"
    )
    assert build_v1(("::1", 1), ("fe80::2", 2)) == b"PROXY TCP6 ::1 fe80::2 1 2\r\n"
    assert build_v1(("127.9.0.1", 1), ("::1", 2)) == b"PROXY UNKNOWN\r\n"


def test_v2_bytes() -> None:
    header = build_v2(("127.9.0.1", 5000), ("127.9.0.2", 80))
    assert header == (
        V2_SIGNATURE
        + b"\x21\x11\x00\x0c"
        + bytes([127, 9, 0, 1, 127, 9, 0, 2])
        + struct.pack("!HH", 5000, 80)
    )
    udp6 = build_v2(("::1", 53), ("::2", 5353), "UDP")
    assert udp6[12:16] == b"\x21\x22\x00\x24" and len(udp6) == 16 + 36
    assert build_v2(("127.9.0.1", 1), ("::1", 2)) == V2_SIGNATURE + b"\x20\x00\x00\x00"


def test_parse_valid_headers_and_what_follows() -> None:
    v1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 80\r\nGET /"
    assert parse(v1) == (36, ("1.2.3.4", 1111), ("5.6.7.8", 80))
    assert parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n") == (35, None, None)
    v2 = build_v2(("::1", 9), ("::2", 10)) + b"payload"
    assert parse(v2) == (52, ("::1", 9), ("::2", 10))
    local = V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert parse(local) == (16, None, None)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
        b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY TCP4 1.2.3.4\n",
        b"PROXY " + b"x" * 120,
        V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
        V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),  # too short for IPv4
        V2_SIGNATURE + b"\x21\x11\xff\xff",  # longer than lbd accepts
    ],
)
def test_parse_rejects(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)


addresses4 = st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535))
addresses6 = st.tuples(st.ip_addresses(v=6).map(str), st.integers(0, 65535))
pairs = st.one_of(st.tuples(addresses4, addresses4), st.tuples(addresses6, addresses6))


@given(pairs, st.sampled_from(["v1", "v2"]), st.binary(max_size=64))
def test_fuzz_round_trip_and_prefixes(pair: tuple, version: str, tail: bytes) -> None:  # type: ignore[type-arg]
    source, destination = pair
    header = build_v1(source, destination) if version == "v1" else build_v2(source, destination)
    assert parse(header + tail) == (len(header), source, destination)
    for cut in range(len(header)):
        assert parse(header[:cut]) is NEED_MORE


@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes_parse_or_raise_proxy_header_error(data: bytes) -> None:
    try:
        result = parse(data)
    except ProxyHeaderError:
        return
    if result is not NEED_MORE:
        length, source, destination = result  # type: ignore[misc]
        assert 0 < length <= min(len(data), MAX_HEADER)
        assert (source is None) == (destination is None)


@given(st.binary(min_size=1, max_size=40))
def test_fuzz_mutated_v2_headers(noise: bytes) -> None:
    header = bytearray(build_v2(("127.9.0.1", 1), ("127.9.0.2", 2)))
    for i, byte in enumerate(noise):
        header[(i * 7 + byte) % len(header)] = byte
    try:
        result = parse(bytes(header))
    except ProxyHeaderError:
        return
    assert result is NEED_MORE or result[0] <= MAX_HEADER  # type: ignore[index]


# -- through lbd ---------------------------------------------------------------------------------


class Recorder(asyncio.Protocol):
    def __init__(self, seen: bytearray, transports: set[asyncio.BaseTransport]) -> None:
        self.seen = seen
        self.transports = transports

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transports.add(transport)

    def data_received(self, data: bytes) -> None:
        self.seen += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.transports.clear()


@contextlib.asynccontextmanager
async def recorder():  # type: ignore[no-untyped-def]
    seen = bytearray()
    transports: set[asyncio.BaseTransport] = set()
    async with tcp_server(lambda: Recorder(seen, transports)) as (host, port, _):
        try:
            yield host, port, seen
        finally:
            for transport in list(transports):
                transport.close()


async def send_from(
    source: str, host: str, port: int, data: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), 5)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(data)
    return reader, writer, sock.getsockname()[1]


async def closed(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_lbd_sends_the_header_byte_exact(version: str) -> None:
    client_ip = fresh_ip()
    async with recorder() as (bh, bp, seen):
        cfg = config(
            document(service_yaml("svc", [(bh, bp)], extra=f"    proxyProtocol: {version}\n"))
        )
        async with running(cfg) as runtime:
            host, port = address_of(runtime)
            _, writer, client_port = await send_from(client_ip, host, port, b"hello")
            await until(lambda: seen.endswith(b"hello"), 5)
            await closed(writer)
    build = build_v1 if version == "v1" else build_v2
    assert bytes(seen) == build((client_ip, client_port), (host, port)) + b"hello"


async def test_a_trusted_header_sets_the_client_and_is_passed_on() -> None:
    proxy_ip = fresh_ip()
    async with recorder() as (bh, bp, seen):
        extra = f"    proxyProtocol: v1\n    acceptProxyProtocolFrom: [{proxy_ip}/32]\n    accessLog: true\n"
        cfg = config(document(service_yaml("svc", [(bh, bp)], extra=extra)))
        async with running(cfg) as runtime:
            host, port = address_of(runtime)
            header = build_v2(("203.0.113.7", 4444), ("198.51.100.1", 443))
            # The header may arrive in pieces.
            _, writer, _ = await send_from(proxy_ip, host, port, header[:10])
            await until(
                lambda: any(c.header and c.header.buffer for c in runtime.connections),
                what="the first piece to be read",
            )
            writer.write(header[10:] + b"payload")
            await until(lambda: seen.endswith(b"payload"), 5)
            connection = next(iter(runtime.connections))
            assert connection.client == "203.0.113.7"
            await closed(writer)
    assert bytes(seen) == b"PROXY TCP4 203.0.113.7 198.51.100.1 4444 443\r\npayload"


async def test_a_spoofed_header_from_an_untrusted_source_is_only_data() -> None:
    trusted, attacker = fresh_ip(), fresh_ip()
    async with recorder() as (bh, bp, seen):
        extra = f"    proxyProtocol: v1\n    acceptProxyProtocolFrom: [{trusted}]\n"
        cfg = config(document(service_yaml("svc", [(bh, bp)], extra=extra)))
        async with running(cfg) as runtime:
            host, port = address_of(runtime)
            spoofed = b"PROXY TCP4 127.9.0.1 127.9.0.2 1 2\r\n"
            _, writer, client_port = await send_from(attacker, host, port, spoofed + b"x")
            await until(lambda: seen.endswith(b"x"), 5)
            assert next(iter(runtime.connections)).client == attacker
            await closed(writer)
    real = build_v1((attacker, client_port), (host, port))
    assert bytes(seen) == real + spoofed + b"x"


@pytest.mark.parametrize("data", [b"GET / HTTP/1.0\r\n\r\n", b"PROXY TCP4 1.2.3.4 nope 1 2\r\n"])
async def test_a_trusted_source_without_a_valid_header_is_closed(data: bytes) -> None:
    trusted = fresh_ip()
    async with recorder() as (bh, bp, seen):
        extra = f"    acceptProxyProtocolFrom: ['{trusted}']\n"
        cfg = config(document(service_yaml("svc", [(bh, bp)], extra=extra)))
        async with running(cfg) as runtime:
            host, port = address_of(runtime)
            reader, writer, _ = await send_from(trusted, host, port, data)
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            await closed(writer)
            stats = route_of(runtime).stats
            assert stats.downstream_cx_refused_total.proxy_header_invalid == 1
            assert upstream_totals(route_of(runtime)).upstream_cx_total == 0
    assert seen == b""
