"""Zero-copy forwarding of bulk transfers: socket -> pipe -> socket with splice(2).

Every connection starts on the Protocol path (``lbd.net.tcp_proxy``): for small messages a read
and a write cost less CPU and latency than two splice calls and a pipe. A direction switches to
a ``SplicePump`` once a single read brings ``BULK_READ`` bytes (the kernel had that much queued:
a stream, not a request), as HAProxy's splice-auto does. From then on its bytes go from one
socket into a pipe and from the pipe into the other socket without entering Python.

The connection keeps its sockets (the other direction still uses them, and close/reset stay
its own): the pump watches ``dup``s of the two descriptors with the event loop, and the
connection no longer reads the source. Backpressure is the pipe: the
pump reads the source only while the pipe can be emptied into the destination, so at most one
pipe (``PIPE_SIZE``) of kernel memory is in flight per direction and none in Python.

Wherever splice is not possible (no ``os.splice``, no descriptor or pipe left) the direction
stays on the Protocol path, counted as a fallback.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import fcntl
import os
from typing import Protocol

from lbd.net.loops import rearm_reader

SPLICE_AVAILABLE = hasattr(os, "splice")
# A read this large means the kernel had this much queued for us: bulk.
BULK_READ = 65536
PIPE_SIZE = 262144  # F_SETPIPE_SZ; the default 64 KiB pipe costs 4x the splice calls
IDLE_PIPES_KEPT = 64
# Splice rounds per readiness event: bounded, so one fast stream cannot starve the loop.
ROUNDS_PER_EVENT = 4
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class PipePool:
    """Idle pipes of this process, reused: a new one costs pipe2 and fcntl, and two fds."""

    __slots__ = ("_idle", "size")

    def __init__(self, size: int = PIPE_SIZE) -> None:
        self.size = size
        self._idle: list[tuple[int, int]] = []

    def get(self) -> tuple[int, int]:
        """A pipe (read end, write end); raises OSError when none can be made (EMFILE...)."""
        if self._idle:
            return self._idle.pop()
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # OSError: over the user's pipe-buffer quota; a default-sized pipe still works.
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, self.size)
        return read_end, write_end

    def put(self, pipe: tuple[int, int], empty: bool) -> None:
        """Return a pipe; one with bytes left in it (a connection cut mid-transfer) is closed."""
        if empty and len(self._idle) < IDLE_PIPES_KEPT:
            self._idle.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    @property
    def idle(self) -> int:
        return len(self._idle)


PIPES = PipePool()


class PumpOwner(Protocol):
    """What a pump reports to the connection it moves bytes for (``upward``: client to
    endpoint)."""

    def pumped(self, upward: bool, count: int) -> None: ...

    def pump_ended(self, upward: bool) -> None: ...  # source EOF, every byte delivered

    def pump_failed(self, upward: bool, at_source: bool, error: OSError) -> None: ...


class SplicePump:
    """One direction of one connection, moved by splice(2) until the source ends or fails."""

    __slots__ = ("_dst", "_loop", "_owner", "_pipe", "_queued", "_src", "_src_eof", "upward")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        src_fd: int,
        dst_fd: int,
        owner: PumpOwner,
        upward: bool,
    ) -> None:
        """Raises OSError (descriptors or pipes exhausted); then nothing is left open."""
        self._loop = loop
        self._owner = owner
        self.upward = upward
        self._queued = 0  # bytes in the pipe, not yet in the destination socket
        self._src_eof = False
        self._pipe = PIPES.get()
        self._src = self._dst = -1
        try:
            self._src = os.dup(src_fd)
            self._dst = os.dup(dst_fd)
            # splice(2) on a socket blocks unless the socket itself is non-blocking (its
            # flag, shared with the connection's descriptor, which never blocks anyway).
            os.set_blocking(self._src, False)
            os.set_blocking(self._dst, False)
        except OSError:
            self._release()
            raise
        loop.add_reader(self._src, self._on_readable)

    @property
    def closed(self) -> bool:
        return self._src < 0

    def close(self) -> None:
        """Stop watching and release the descriptors; the transports close the sockets."""
        if self._src >= 0:
            self._loop.remove_reader(self._src)
            self._loop.remove_writer(self._dst)
            self._release()

    def _release(self) -> None:
        for fd in (self._src, self._dst):
            if fd >= 0:
                os.close(fd)
        self._src = self._dst = -1
        PIPES.put(self._pipe, self._queued == 0)

    def _on_readable(self) -> None:
        # Called only with an empty pipe (_flush emptied it, or stopped this reader), so a read
        # may fill the whole pipe; a length of 0 would read as EOF.
        moved = 0
        rounds_left = ROUNDS_PER_EVENT
        try:
            while rounds_left:
                rounds_left -= 1
                count = os.splice(self._src, self._pipe[1], PIPES.size, flags=_FLAGS)
                if count == 0:
                    self._src_eof = True
                    break
                moved += count
                self._queued += count
                if not self._flush():
                    break
            else:
                # The source may hold more: see rearm_reader for why it must be asked again.
                rearm_reader(self._loop, self._src, self._on_readable)
        except BlockingIOError:
            pass  # the source is empty for now
        except OSError as error:
            self._fail(error, at_source=not isinstance(error, _DstError))
            return
        if moved:
            self._owner.pumped(self.upward, moved)
        if self._src_eof and self._queued == 0:
            self._end()

    def _on_writable(self) -> None:
        try:
            if not self._flush():
                return
        except OSError as error:
            self._fail(error, at_source=False)
            return
        self._loop.remove_writer(self._dst)
        if self._src_eof:
            self._end()
        else:
            self._loop.add_reader(self._src, self._on_readable)

    def _flush(self) -> bool:
        """Move the pipe into the destination. False: the destination is full, so stop reading
        the source and wait until it can take more (the pipe is the only buffer)."""
        while self._queued:
            try:
                count = os.splice(self._pipe[0], self._dst, self._queued, flags=_FLAGS)
            except BlockingIOError:
                self._loop.remove_reader(self._src)
                self._loop.add_writer(self._dst, self._on_writable)
                return False
            except OSError as error:
                raise _DstError(error.errno, error.strerror) from error
            self._queued -= count
        return True

    def _end(self) -> None:
        self.close()
        self._owner.pump_ended(self.upward)

    def _fail(self, error: OSError, at_source: bool) -> None:
        self.close()
        self._owner.pump_failed(self.upward, at_source, error)


class SpliceStats(Protocol):
    """Where switches are counted (``lbd.observability.stats.RouteStats``)."""

    splice_switches_total: int
    splice_fallbacks_total: int


class SpliceEnd(Protocol):
    """One socket of a connection as a pump needs it (``lbd.net.tcp_socket.SocketWriter``)."""

    sock: _socket.socket | None
    out: bytes | None  # bytes kept for the socket: it must be empty before a pump writes
    reading: bool  # the connection reads it; a pump's source is not read by the connection


def switch_to_splice(
    loop: asyncio.AbstractEventLoop,
    source: SpliceEnd,
    destination: SpliceEnd,
    owner: PumpOwner,
    pumps: list[SplicePump | None],
    upward: bool,
    stats: SpliceStats,
) -> None:
    """Move ``source`` → ``destination`` with a pump from now on (counted), if splice exists,
    the direction is not pumped yet, and nothing is kept for the destination (the bytes' order);
    else a later bulk read tries again. When no descriptor or pipe was left, the direction
    stays on the copy path (counted as a fallback)."""
    index = 0 if upward else 1
    if not SPLICE_AVAILABLE or pumps[index] is not None or destination.out is not None:
        return
    if source.sock is None or destination.sock is None:
        return
    try:
        pump = SplicePump(loop, source.sock.fileno(), destination.sock.fileno(), owner, upward)
    except OSError:
        stats.splice_fallbacks_total += 1
        return
    source.reading = False  # the pump reads it from now on
    pumps[index] = pump
    stats.splice_switches_total += 1


class _DstError(OSError):
    """A splice into the destination socket failed (tells a reset destination from a reset
    source)."""
