"""One active health probe: connect (``tcp``), optionally send/expect bytes, or an HTTP GET.

Streams are fine here: this is the control plane, one probe per endpoint per interval.
A probe returns None when the endpoint is healthy, or the reason it is not. A failure that is
lbd's own (out of file descriptors, out of memory) raises ``LocalError`` instead: it says
nothing about the endpoint and must not mark it down.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno

from lbd.config.model import HealthCheck

MAX_READ = 4096
# errno values that are about this process or host, not about the endpoint.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class LocalError(Exception):
    """The probe could not run; the endpoint's state must not change."""


async def probe(address: str, port: int, check: HealthCheck) -> str | None:
    try:
        async with asyncio.timeout(check.timeout):
            reader, writer = await asyncio.open_connection(address, port)
            try:
                if check.type == "http":
                    return await _http(reader, writer, address, port, check)
                return await _tcp(reader, writer, check)
            finally:
                writer.close()
                await _closed(writer)
    except TimeoutError:
        return "timeout"
    except OSError as error:
        if error.errno in LOCAL_ERRNOS:
            raise LocalError(error.strerror or str(error)) from None
        return error.strerror or type(error).__name__
    except RuntimeError as error:
        # uvloop: writing to a transport the peer already closed.
        return str(error) or "connection closed"


async def _closed(writer: asyncio.StreamWriter) -> None:
    # OSError/RuntimeError: the peer reset the connection we are closing anyway.
    with contextlib.suppress(OSError, RuntimeError):
        await writer.wait_closed()


async def _tcp(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, check: HealthCheck
) -> str | None:
    if check.send:
        writer.write(check.send)
        await writer.drain()
    if not check.expect:
        return None
    seen = b""
    while len(seen) < MAX_READ:
        chunk = await reader.read(MAX_READ - len(seen))
        if not chunk:
            break
        seen += chunk
        if check.expect in seen:
            return None
    return f"expected {check.expect!r}, got {seen[:64]!r}"


async def _http(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    address: str,
    port: int,
    check: HealthCheck,
) -> str | None:
    host = check.host or (f"[{address}]:{port}" if ":" in address else f"{address}:{port}")
    writer.write(
        f"GET {check.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lbd-health-check\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    await writer.drain()
    line = await reader.readline()
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return f"not an HTTP response: {line[:64]!r}"
    status = int(parts[1])
    low, high = check.expect_status
    if not low <= status <= high:
        return f"status {status}"
    return None
