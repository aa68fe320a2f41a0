"""Connection mirroring: a copy of the client's bytes goes to a shadow endpoint (docs/faults.md).

A mirrored connection (``mirror: {endpoint, percent}``; chosen in ``lbd.net.tcp_faults``) gets a
``Shadow``: its own connection to the shadow endpoint, fed with a copy of every byte the client
sends (before any fault acts on them) and its FIN; the shadow's replies are read and dropped.

The mirror can never slow or break the real connection: the copy never pauses the client, it
waits in the shadow's own buffer, bounded by ``MIRROR_BUFFER``. A shadow that falls that far
behind, refuses, fails or resets loses its copy at once (counted; the rest of the client's
bytes are counted as dropped), rather than receiving a stream with a hole in it. When the real
connection ends, the shadow gets ``LINGER`` seconds to take what is still buffered.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from lbd.config.faultspec import Mirror
from lbd.net.connections import Abortable
from lbd.observability.stats import RouteStats

MIRROR_BUFFER = 1024 * 1024  # bytes of one connection's copy waiting for the shadow, at most
LINGER = 5.0  # seconds a copy may take to deliver its last bytes after the connection ended


class Shadow(asyncio.Protocol):
    """The shadow endpoint's copy of one client connection."""

    __slots__ = (
        "_connecting",
        "_ended",
        "_eof",
        "_pending",
        "_pending_size",
        "_timer",
        "broken",
        "lingering",
        "loop",
        "stats",
        "transport",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        mirror: Mirror,
        stats: RouteStats,
        lingering: set[Abortable],
        connect_timeout: float,
    ) -> None:
        self.loop = loop
        self.stats = stats
        self.lingering = lingering  # shutdown aborts a copy still in there
        self.transport: asyncio.Transport | None = None
        self.broken = False  # refused, failed or fell behind: copies no more
        self._pending: list[bytes] = []  # copied before the shadow's connect completed
        self._pending_size = 0
        self._eof = False
        self._ended = False  # the real connection ended
        stats.mirror_cx_total += 1
        lingering.add(self)
        # Control path, one per mirrored connection: a task is fine here.
        connecting = asyncio.ensure_future(
            loop.create_connection(lambda: self, mirror.address, mirror.port), loop=loop
        )
        connecting.add_done_callback(self._connected)
        self._connecting: asyncio.Future[Any] | None = connecting
        self._timer: asyncio.TimerHandle | None = loop.call_later(connect_timeout, self._break)

    def copy(self, data: bytes) -> None:
        """A copy of ``data`` for the shadow, unless that would pass MIRROR_BUFFER."""
        if self.broken:
            self.stats.mirror_bytes_dropped_total += len(data)
            return
        transport = self.transport
        if transport is None or self._connecting is not None:  # not connected, or not flushed
            if self._pending_size + len(data) > MIRROR_BUFFER:
                self._break()
                self.stats.mirror_bytes_dropped_total += len(data)
                return
            self._pending.append(data)
            self._pending_size += len(data)
            return
        if transport.get_write_buffer_size() + len(data) > MIRROR_BUFFER:
            self._break()
            self.stats.mirror_bytes_dropped_total += len(data)
            return
        transport.write(data)
        self.stats.mirror_bytes_sent_total += len(data)

    def copy_eof(self) -> None:
        if self.broken or self._eof:
            return
        self._eof = True
        if self.transport is not None and self._connecting is None:
            self.transport.write_eof()

    def close(self) -> None:
        """The real connection ended: the copy closes once the shadow took what is buffered
        (or after LINGER seconds at most)."""
        if self._ended:
            return
        self._ended = True
        if self.broken:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(LINGER, self.abort)
        if self.transport is not None and self._connecting is None:
            self.transport.close()

    def abort(self) -> None:
        """Stop at once (shutdown, or LINGER passed)."""
        self.broken = True
        self._done()
        if self._connecting is not None:
            self._connecting.cancel()
        if self.transport is not None:
            self.transport.abort()

    def _break(self) -> None:
        """The shadow refused, failed, timed out or fell behind: its copy ends here."""
        if self.broken:
            return
        self.stats.mirror_cx_failed_total += 1
        self.stats.mirror_bytes_dropped_total += self._pending_size
        self.abort()

    def _done(self) -> None:
        self._pending = []
        self._pending_size = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.lingering.discard(self)

    def _connected(self, future: asyncio.Future[Any]) -> None:
        self._connecting = None
        if future.cancelled():
            return
        if future.exception() is not None:
            self._break()
            return
        transport = self.transport
        if transport is None or self.broken:
            return
        if not self._ended and self._timer is not None:
            self._timer.cancel()  # the connect timeout; a LINGER timer stays
            self._timer = None
        pending, self._pending, self._pending_size = self._pending, [], 0
        for data in pending:
            transport.write(data)
            self.stats.mirror_bytes_sent_total += len(data)
        if self._eof:
            transport.write_eof()
        if self._ended:
            transport.close()

    # -- asyncio.Protocol: the shadow's side ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        pass  # the shadow's replies are read and dropped

    def eof_received(self) -> bool:
        return True  # the shadow finished sending; the copy may go on

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._ended and not self.broken:
            self._break()  # the shadow closed or reset while the connection still runs
        self.broken = True
        self._done()
