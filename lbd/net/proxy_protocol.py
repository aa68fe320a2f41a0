"""The PROXY protocol (HAProxy's, v1 text and v2 binary): build headers, parse them.

Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt. lbd writes a header to
endpoints of a service with ``proxyProtocol``, and reads one from clients inside a service's
``acceptProxyProtocolFrom`` networks (only there: a header from anywhere else is just data).
Parsing is pure and bounded: it never reads past ``MAX_HEADER`` bytes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from typing import Final, Literal

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX: Final = b"PROXY "
V1_MAX: Final = 107  # the longest v1 line, CRLF included
V2_MAX_PAYLOAD: Final = 2048  # addresses plus TLVs we are willing to skip
MAX_HEADER: Final = 16 + V2_MAX_PAYLOAD

Address = tuple[str, int]
Transport = Literal["TCP", "UDP"]

_V2_FAMILIES = {0x11: (4, "TCP"), 0x12: (4, "UDP"), 0x21: (6, "TCP"), 0x22: (6, "UDP")}


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY header."""


class NeedMore:
    """The bytes so far are a valid beginning of a header: read more."""

    __slots__ = ()


NEED_MORE: Final = NeedMore()


def _version(host: str) -> int:
    return 6 if ":" in host else 4


def build_v1(source: Address, destination: Address) -> bytes:
    family = _version(source[0])
    if family != _version(destination[0]):
        return b"PROXY UNKNOWN\r\n"  # v1 cannot say mixed families
    return (
        f"PROXY TCP{family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
    ).encode()


def build_v2(source: Address, destination: Address, transport: Transport = "TCP") -> bytes:
    family = _version(source[0])
    if family != _version(destination[0]):
        return V2_SIGNATURE + b"\x20\x00\x00\x00"  # LOCAL: the endpoint uses the real peer
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    code = (0x10 if family == 4 else 0x20) | (0x01 if transport == "TCP" else 0x02)
    body = (
        socket.inet_pton(af, source[0])
        + socket.inet_pton(af, destination[0])
        + struct.pack("!HH", source[1], destination[1])
    )
    return V2_SIGNATURE + bytes((0x21, code)) + struct.pack("!H", len(body)) + body


def parse(data: bytes) -> tuple[int, Address | None, Address | None] | NeedMore:
    """(header length, source, destination) for a complete header at the start of ``data``
    (source/destination None for LOCAL, UNKNOWN or non-IP families), ``NEED_MORE`` for a valid
    beginning. Raises ProxyHeaderError for anything else."""
    if data[:12] == V2_SIGNATURE[: len(data[:12])]:
        return _parse_v2(data) if len(data) >= 16 else NEED_MORE
    if data[:6] == V1_PREFIX[: len(data[:6])]:
        return _parse_v1(data) if len(data) >= 6 else NEED_MORE
    raise ProxyHeaderError("no PROXY protocol header")


def _parse_v1(data: bytes) -> tuple[int, Address | None, Address | None] | NeedMore:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("v1 header longer than 107 bytes")
        if b"\n" in data or b"\r" in data[:-1]:
            raise ProxyHeaderError("v1 header with a stray line break")
        return NEED_MORE
    try:
        parts = data[:end].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 header is not ASCII") from None
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return end + 2, None, None
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("v1 header must be PROXY TCP4|TCP6 src dst sport dport")
    version = 4 if parts[1] == "TCP4" else 6
    source = (_v1_address(parts[2], version), _v1_port(parts[4]))
    destination = (_v1_address(parts[3], version), _v1_port(parts[5]))
    return end + 2, source, destination


def _v1_address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"v1 header: bad address {text[:46]!r}") from None
    if address.version != version:
        raise ProxyHeaderError(f"v1 header: {text} is not IPv{version}")
    return str(address)


def _v1_port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or len(text) > 5 or int(text) > 65535:
        raise ProxyHeaderError(f"v1 header: bad port {text[:8]!r}")
    return int(text)


def _parse_v2(data: bytes) -> tuple[int, Address | None, Address | None] | NeedMore:
    version_command, family = data[12], data[13]
    (length,) = struct.unpack_from("!H", data, 14)
    if version_command >> 4 != 2 or version_command & 0x0F > 1:
        raise ProxyHeaderError(f"v2 header: bad version/command byte {version_command:#04x}")
    if length > V2_MAX_PAYLOAD:
        raise ProxyHeaderError(f"v2 header: {length} bytes of addresses is too long")
    if len(data) < 16 + length:
        return NEED_MORE
    total = 16 + length
    if version_command & 0x0F == 0 or family not in _V2_FAMILIES:
        if family >> 4 > 3 or family & 0x0F > 2:
            raise ProxyHeaderError(f"v2 header: bad family byte {family:#04x}")
        return total, None, None  # LOCAL, UNSPEC or AF_UNIX: the connection's own peer
    version, _ = _V2_FAMILIES[family]
    size = 4 if version == 4 else 16
    if length < 2 * size + 4:
        raise ProxyHeaderError(f"v2 header: {length} bytes cannot hold IPv{version} addresses")
    # ipaddress, not inet_ntop: the same text as a v1 header or the config would give.
    source_ip = str(ipaddress.ip_address(data[16 : 16 + size]))
    destination_ip = str(ipaddress.ip_address(data[16 + size : 16 + 2 * size]))
    source_port, destination_port = struct.unpack_from("!HH", data, 16 + 2 * size)
    return total, (source_ip, source_port), (destination_ip, destination_port)


# -- on a connection: trusting and reading a client's header, writing one upstream ---------------

# A trusted client must send its PROXY header this soon (HAProxy's default is the client
# timeout; a header is one packet, so a few seconds is plenty).
HEADER_TIMEOUT = 3.0
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted(client: str, networks: tuple[Network, ...]) -> bool:
    """Whether ``client`` may send a PROXY header (it is inside ``acceptProxyProtocolFrom``)."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:  # not an IP peer (cannot happen on TCP listeners)
        return False
    return any(address in network for network in networks)


class HeaderReader:
    """A trusted client's PROXY header, read before any of its bytes is forwarded; it must
    be complete within ``HEADER_TIMEOUT`` (the timer calls ``on_timeout``)."""

    __slots__ = ("buffer", "timer")

    def __init__(self, timer: asyncio.TimerHandle) -> None:
        self.buffer = b""
        self.timer = timer  # cancelled by ``close``

    def feed(self, data: bytes) -> tuple[bytes, Address | None, Address | None] | None:
        """(the bytes after the header, source, destination) once the header is complete,
        None while more is needed; raises ProxyHeaderError for anything that is no header."""
        buffer = self.buffer + data
        result = parse(buffer[:MAX_HEADER])
        if isinstance(result, NeedMore):
            if len(buffer) >= MAX_HEADER:
                raise ProxyHeaderError("header too long")
            self.buffer = buffer
            return None
        length, source, destination = result
        return buffer[length:], source, destination

    def close(self) -> None:
        self.timer.cancel()


def outgoing(version: str, client: Address, local: Address) -> bytes:
    """The header written to an endpoint before the client's first byte."""
    if version == "v1":
        return build_v1(client, local)
    return build_v2(client, local, "TCP")
