"""Idle TCP connections for the memory workload.

`serve HOST PORT`: accept and hold connections, discarding any bytes (the idle backend).
`open HOST PORT --count N --source-base 127.1.S`: open N connections to HOST:PORT from several
source addresses (127.1.S.1 .. 127.1.S.k, so ephemeral ports never run short), print
`{"opened": N}` once all are connected, hold them until a line (or EOF) arrives on stdin, then
close them all and exit. Both modes stop by themselves after --max-time seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import sys

IP_BIND_ADDRESS_NO_PORT = 24  # choose the port at connect(), per 4-tuple (Linux >= 4.2)


class Sink(asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        pass


async def serve(host: str, port: int, max_time: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Sink, host, port, backlog=4096, reuse_address=True)
    async with server:
        await asyncio.sleep(max_time)


def client_socket(source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((source, 0))
    sock.setblocking(False)
    return sock


async def open_all(
    host: str, port: int, count: int, source_base: str, sources: int, max_time: float
) -> None:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(256)  # bounded concurrency: do not overflow the proxy's backlog
    transports: list[asyncio.BaseTransport] = []

    async def one(i: int) -> None:
        async with gate:
            sock = client_socket(f"{source_base}.{1 + i % sources}")
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), 10.0)
            transport, _ = await loop.create_connection(Sink, sock=sock)
            transports.append(transport)

    async with asyncio.timeout(max_time):
        await asyncio.gather(*(one(i) for i in range(count)))
        print(json.dumps({"opened": len(transports)}), flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
    for transport in transports:
        transport.close()
    await asyncio.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["serve", "open"])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--source-base", default="127.1.0")
    parser.add_argument("--sources", type=int, default=8)
    parser.add_argument("--max-time", type=float, default=600.0)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.mode == "serve":
        asyncio.run(serve(args.host, args.port, args.max_time))
    else:
        asyncio.run(
            open_all(
                args.host, args.port, args.count, args.source_base, args.sources, args.max_time
            )
        )


if __name__ == "__main__":
    main()
