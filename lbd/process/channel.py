"""A message channel between two lbd processes (supervisor and worker, or an lbd and its
successor): pickled messages (``lbd.process.messages``) over a unix stream socket, with file
descriptors (listening sockets) passed alongside (SCM_RIGHTS).

Frames are ``[length:4][fd count:2][pickle]``; a frame's descriptors travel in the ancillary
data of the ``sendmsg`` that carries its first byte, so by the time a frame is complete its
descriptors have arrived too. Both ends belong to one user and one lbd: pickle is safe here
(the socketpair is created by the supervisor and inherited by its own children).
"""

from __future__ import annotations

import array
import asyncio
import collections
import pickle
import socket
import struct
from collections.abc import Callable

from lbd.net.loops import rearm_reader

HEADER = struct.Struct("!IH")
MAX_FDS = 512  # per frame; a reload adding more listeners sends several frames
MAX_FRAME = 64 * 1024 * 1024  # a metrics snapshot of a very large config, with room to spare
RECV_SIZE = 256 * 1024
READS_PER_WAKEUP = 16

# What arrives: a message (lbd.process.messages) and the sockets that came with it.
Receiver = Callable[[object, list[socket.socket]], None]


class ChannelClosed(ConnectionError):
    """The other end is gone (it exited, or closed the channel)."""


class Channel:
    """Non-blocking both ways on the running loop; ``on_message`` gets each message with the
    sockets that came with it (the handler owns them), ``on_close`` is called once at EOF."""

    def __init__(self, sock: socket.socket, on_message: Receiver, on_close: Callable[[], None]):
        sock.setblocking(False)
        self.sock = sock
        self._on_message = on_message
        self._on_close = on_close
        self._buffer = bytearray()
        self._fds: collections.deque[int] = collections.deque()
        self._out: collections.deque[tuple[memoryview, list[int]]] = collections.deque()
        self._loop = asyncio.get_running_loop()
        self._writing = False
        self.closed = False
        self._loop.add_reader(sock.fileno(), self._readable)

    def send(self, message: object, sockets: list[socket.socket] | None = None) -> None:
        """Queue ``message`` (and duplicates of ``sockets``: the caller keeps its own)."""
        if self.closed:
            raise ChannelClosed("channel closed")
        fds = [s.fileno() for s in sockets or ()]
        if len(fds) > MAX_FDS:
            raise ValueError(f"at most {MAX_FDS} sockets per message")
        body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._out.append((memoryview(HEADER.pack(len(body), len(fds)) + body), fds))
        if not self._writing:
            self._flush()

    def _flush(self) -> None:
        while self._out:
            data, fds = self._out[0]
            ancillary = (
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            )
            try:
                sent = self.sock.sendmsg([data], ancillary)
            except BlockingIOError:
                break
            except OSError:
                self.close()
                return
            if sent < len(data):
                self._out[0] = (data[sent:], [])  # the descriptors went with the first byte
                break
            self._out.popleft()
        want = bool(self._out)
        if want != self._writing:
            self._writing = want
            if want:
                self._loop.add_writer(self.sock.fileno(), self._flush)
            else:
                self._loop.remove_writer(self.sock.fileno())

    def flush_blocking(self, timeout: float = 5.0) -> None:
        """Send what is queued before returning (a last message before closing)."""
        if not self._out or self.closed:
            return
        self.sock.settimeout(timeout)
        try:
            while self._out:
                data, fds = self._out.popleft()
                ancillary = (
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
                )
                sent = self.sock.sendmsg([data], ancillary)
                if sent < len(data):
                    self._out.appendleft((data[sent:], []))
        except OSError:
            self.close()
            return
        finally:
            if not self.closed:
                self.sock.setblocking(False)
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        # Read until the socket is dry, so a wakeup that uvloop will not repeat (a peer that
        # closed with bytes unread: ECONNRESET, see rearm_reader) still delivers every frame
        # and then the close; bounded, so one busy channel cannot hold the loop.
        for _ in range(READS_PER_WAKEUP):
            if self.closed or not self._read_once():
                return
        rearm_reader(self._loop, self.sock.fileno(), self._readable)

    def _read_once(self) -> bool:
        """One recvmsg; False once the socket is dry or the channel closed."""
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(
                RECV_SIZE, socket.CMSG_SPACE(MAX_FDS * 4)
            )
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:  # ECONNRESET: the other end closed with bytes unread
            data, ancdata = b"", []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        if not data:
            self.close()
            return False
        self._buffer += data
        self._deliver()
        return True

    def _deliver(self) -> None:
        while len(self._buffer) >= HEADER.size:
            length, count = HEADER.unpack_from(self._buffer)
            if length > MAX_FRAME:
                self.close()  # not a frame lbd wrote: the worker is replaced, not trusted
                return
            end = HEADER.size + length
            if len(self._buffer) < end:
                return
            message = pickle.loads(self._buffer[HEADER.size : end])
            del self._buffer[:end]
            sockets = [socket.socket(fileno=self._fds.popleft()) for _ in range(count)]
            self._on_message(message, sockets)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.sock.fileno())
        if self._writing:
            self._loop.remove_writer(self.sock.fileno())
        self.sock.close()
        while self._fds:
            socket.socket(fileno=self._fds.popleft()).close()
        self._on_close()
