"""A backend host for the namespace tests: says who it is and whom it saw, over TCP and UDP.

    python tests/netbackend.py tcp:10.201.16.21:8080 udp:10.201.16.21:8053 proxy:...:8081

Each TCP connection gets one line, ``<address:port it answered on> <peer address>``, then EOF.
A ``proxy`` port first reads a PROXY protocol v1 line and answers with the address in it
(``<address:port> <peer> <client from the header>``): what the backend learns of the real client.
Each UDP datagram is answered with ``<address:port> <peer address>``. Prints ``ready`` once
every socket is bound. Runs until killed (the test stops it by PID).
"""

from __future__ import annotations

import asyncio
import sys


def serve_tcp(where: str, proxy: bool) -> asyncio.Protocol:
    class Answer(asyncio.Protocol):
        def __init__(self) -> None:
            self.buffer = b""
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]
            if not proxy:
                self.answer("")

        def data_received(self, data: bytes) -> None:
            if not proxy or self.transport is None:
                return
            self.buffer += data
            if b"\r\n" in self.buffer:
                header = self.buffer.split(b"\r\n", 1)[0].decode(errors="replace").split()
                self.answer(header[2] if len(header) > 2 else "no-header")

        def answer(self, extra: str) -> None:
            assert self.transport is not None
            peer = self.transport.get_extra_info("peername")[0]
            self.transport.write(f"{where} {peer} {extra}".strip().encode() + b"\n")
            self.transport.close()

    return Answer()


class UdpAnswer(asyncio.DatagramProtocol):
    def __init__(self, where: str) -> None:
        self.where = where
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(f"{self.where} {addr[0]}".encode(), addr)


async def main(specs: list[str]) -> None:
    loop = asyncio.get_running_loop()
    for spec in specs:
        kind, rest = spec.split(":", 1)
        host, port_text = rest.rsplit(":", 1)
        port = int(port_text)
        where = f"{host}:{port}"
        if kind == "udp":
            await loop.create_datagram_endpoint(lambda w=where: UdpAnswer(w), (host, port))
        else:
            await loop.create_server(
                lambda w=where, p=kind == "proxy": serve_tcp(w, p), host, port, backlog=1024
            )
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
