"""One socket of a proxied TCP connection, as both halves use it: non-blocking calls on a
plain socket watched by the worker's ``Reactor``, and what the socket could not take yet.

Reads go into one receive buffer per process (``VIEW``): each read is written on, or copied,
before the next read, so the common case, the destination takes it all, copies nothing. What
the destination cannot take is kept (``out``) and the source is not read again until it has
gone (cross-coupled flow control: at most one read per direction is held in Python). A
half-close waits behind the kept bytes. Accepted sockets stay in blocking mode (making them
non-blocking would cost a system call each): every call here passes MSG_DONTWAIT instead.
"""

from __future__ import annotations

import _socket
import socket
import struct

DONTWAIT = socket.MSG_DONTWAIT
READ_SIZE = 262144  # as uvloop's read buffer
VIEW = memoryview(bytearray(READ_SIZE))
_LINGER_RESET = struct.pack("ii", 1, 0)


def set_reset(sock: _socket.socket) -> None:
    """Make the socket's close send an RST instead of a FIN, dropping what is buffered."""
    try:  # noqa: SIM105 (no context manager on the per-connection path)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # already gone: closing it is all that is left


class SocketWriter:
    """The sending side of one socket; raises OSError when the socket has failed."""

    __slots__ = ("out", "out_eof", "sock")

    def __init__(self, sock: _socket.socket | None) -> None:
        self.sock = sock
        self.out: bytes | None = None  # bytes the socket could not take yet
        self.out_eof = False  # a half-close waits for ``out`` to go

    def send(self, data: bytes | memoryview) -> bool:
        """Send ``data`` (it may be a view of ``VIEW``: what is left is copied). False: some
        is kept for later; the source must not be read until ``flush`` says it went."""
        assert self.sock is not None
        if self.out is not None:
            self.out += bytes(data)
            return False
        try:
            sent = self.sock.send(data, DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return True
        self.out = bytes(data[sent:])
        return False

    def flush(self) -> bool:
        """Send what was kept (and then a waiting half-close); True once nothing is left."""
        out = self.out
        if out is not None:
            assert self.sock is not None
            try:
                sent = self.sock.send(out, DONTWAIT)
            except BlockingIOError:
                return False
            if sent < len(out):
                self.out = out[sent:]
                return False
            self.out = None
        if self.out_eof:
            self._shutdown()
        return True

    def write_eof(self) -> None:
        """Half-close once everything kept has been sent."""
        if self.out is None:
            self._shutdown()
        else:
            self.out_eof = True

    def _shutdown(self) -> None:
        self.out_eof = False
        assert self.sock is not None
        try:  # noqa: SIM105 (no context manager on the per-connection path)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer reset or left: reading this socket reports it

    def buffered(self) -> int:
        """Bytes kept in Python for this socket."""
        return len(self.out) if self.out is not None else 0
