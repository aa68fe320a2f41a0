"""A client host for the namespace tests: many short requests, each from a chosen source.

    echo '{"requests": [{"proto": "tcp", "host": "10.96.0.10", "port": 80,
        "source": "10.201.1.7"}], "concurrency": 64, "timeout": 2}' | python tests/netclient.py

Prints one JSON list: per request ``{"reply": "<first line>"}`` or ``{"error": "<exception>"}``.
TCP: connect (from ``source`` when given), read one line. UDP: send ``ping`` from ``source``,
read one datagram. Every request has a deadline, and the batch is bounded by its size.

With ``"interval": S`` the requests start S seconds apart whatever the earlier ones do (an
open loop, as independent clients arrive), and each result is printed as one JSON line when it
completes, with its index ``i`` and start time ``t``: a test can act while the load runs.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from typing import Any


async def tcp(request: dict[str, Any], timeout: float) -> str:
    family = socket.AF_INET6 if ":" in request["host"] else socket.AF_INET
    source = request.get("source")
    local = (source, 0) if source else None
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(request["host"], request["port"], local_addr=local, family=family),
        timeout,
    )
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
    return line.decode().strip() or "closed"


async def udp(request: dict[str, Any], timeout: float) -> str:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in request["host"] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        if request.get("source"):
            sock.bind((request["source"], 0))
        sock.connect((request["host"], request["port"]))
        await loop.sock_sendall(sock, b"ping")
        data = await asyncio.wait_for(loop.sock_recv(sock, 2048), timeout)
    finally:
        sock.close()
    return data.decode()


async def one(request: dict[str, Any], timeout: float, gate: asyncio.Semaphore) -> dict[str, str]:
    async with gate:
        try:
            handler = udp if request["proto"] == "udp" else tcp
            return {"reply": await handler(request, timeout)}
        except (OSError, TimeoutError) as error:
            return {"error": type(error).__name__}


async def main(spec: dict[str, Any]) -> list[dict[str, str]]:
    gate = asyncio.Semaphore(spec.get("concurrency", 32))
    timeout = spec.get("timeout", 2.0)
    return await asyncio.gather(*(one(r, timeout, gate) for r in spec["requests"]))


async def stream(spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(len(spec["requests"]))
    timeout = spec.get("timeout", 1.0)
    started = loop.time()

    async def timed(index: int, request: dict[str, Any]) -> None:
        begun = loop.time() - started
        result: dict[str, Any] = {**await one(request, timeout, gate), "i": index, "t": begun}
        print(json.dumps(result), flush=True)

    tasks = []
    for index, request in enumerate(spec["requests"]):
        await asyncio.sleep(max(0.0, started + index * spec["interval"] - loop.time()))
        tasks.append(asyncio.create_task(timed(index, request)))
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    given = json.loads(sys.stdin.read())
    if "interval" in given:
        asyncio.run(stream(given))
    else:
        print(json.dumps(asyncio.run(main(given))))
