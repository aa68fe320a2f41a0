"""Listening sockets, bound the way a node proxy needs them."""

from __future__ import annotations

import contextlib
import socket

# Not in Python's socket module before 3.12; values from <linux/in.h> and <linux/in6.h>.
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND = getattr(socket, "IPV6_FREEBIND", 78)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
LISTEN_BACKLOG = 4096
# A UDP listener carries every client of a service port: a deep receive queue absorbs bursts
# (the kernel caps it at net.core.rmem_max / wmem_max; 64 KiB datagrams need room for several).
UDP_LISTENER_BUFFER = 4 * 1024 * 1024


class InheritedSockets:
    """Listening sockets bound by another process (the supervisor, or the lbd being replaced),
    keyed by ``ListenerSpec.identity`` (protocol, address, port). ``take`` hands each out once;
    a listener not found here is bound anew."""

    def __init__(self, sockets: dict[tuple[object, ...], socket.socket] | None = None) -> None:
        self.sockets = dict(sockets or {})
        self.taken: set[tuple[object, ...]] = set()  # the keys handed out (a restart reports them)

    def add(self, key: tuple[object, ...], sock: socket.socket) -> None:
        old = self.sockets.pop(key, None)
        if old is not None:
            old.close()
        self.sockets[key] = sock

    def take(self, key: tuple[object, ...]) -> socket.socket | None:
        sock = self.sockets.pop(key, None)
        if sock is not None:
            sock.setblocking(False)
            self.taken.add(key)
        return sock

    def take_copies(self, key: tuple[object, ...]) -> list[socket.socket]:
        """The further SO_REUSEPORT copies of ``key``'s listener handed over with it (keyed
        ``copy_key(key, 1)``, 2, ...): a process that adopts them accepts from each."""
        copies: list[socket.socket] = []
        while (sock := self.take(copy_key(key, len(copies) + 1))) is not None:
            copies.append(sock)
        return copies

    def close(self) -> None:
        """Close what nobody took (a listener the new config no longer has)."""
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()


def copy_key(key: tuple[object, ...], number: int) -> tuple[object, ...]:
    """The handoff key of copy ``number`` of listener ``key``'s socket (0: the listener's own
    key). A TCP listener's SO_REUSEPORT copies are numbered by the supervisor that keeps them
    (copy i is worker i's); a UDP listener's copy i is the socket worker i bound."""
    return key if number == 0 else (*key, "copy", number)


def copy_of(key: tuple[object, ...]) -> tuple[tuple[object, ...], int]:
    """(listener key, copy number) of a handoff key: ``copy_key`` backwards."""
    if len(key) > 2 and key[-2] == "copy" and isinstance(key[-1], int):
        return key[:-2], key[-1]
    return key, 0


def listen_again(sock: socket.socket) -> None:
    """Listen on a bound TCP socket that may have stopped: shut by ``shutdown()`` (a worker's
    REJECT) or destroyed from outside (``ss -K``). A destroyed socket keeps its address (bound
    to a port number), but stays shut for sending, and so would every connection accepted
    from it (their sends fail with EPIPE): listening once and shutting down clears that."""
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.listen(1)
        sock.shutdown(socket.SHUT_RDWR)
    sock.listen(LISTEN_BACKLOG)


def bind_tcp_listener(address: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking listening TCP socket on (address, port).

    IP_FREEBIND lets a ClusterIP or LoadBalancer IP listener start before the address is
    configured on the host, as kube-proxy's rules do. IPv6 sockets are V6ONLY so that ``::``
    never silently takes IPv4 traffic meant for another listener.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit it (Linux): no setsockopt per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            _try_setsockopt(sock, socket.IPPROTO_IPV6, IPV6_FREEBIND)
        else:
            _try_setsockopt(sock, socket.IPPROTO_IP, IP_FREEBIND)
        sock.bind((address, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _try_setsockopt(sock: socket.socket, level: int, option: int, value: int = 1) -> None:
    # An old kernel without the option: binding then needs the address to exist (FREEBIND),
    # or the socket keeps the kernel's default buffer size.
    with contextlib.suppress(OSError):
        sock.setsockopt(level, option, value)


def bind_udp_listener(address: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking UDP socket on (address, port).

    No SO_REUSEADDR: for UDP it would let a second socket share the port and take part of its
    datagrams; ``reuse_port`` is for lbd's own workers (SO_REUSEPORT admits only sockets of the
    same user that set it too, and hashes each client address to one of them). A wildcard address
    gets IP_PKTINFO (IPV6_RECVPKTINFO), so each datagram says
    which local address it was sent to and the reply can leave from exactly that address.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        _try_setsockopt(sock, socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_LISTENER_BUFFER)
        _try_setsockopt(sock, socket.SOL_SOCKET, socket.SO_SNDBUF, UDP_LISTENER_BUFFER)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            _try_setsockopt(sock, socket.IPPROTO_IPV6, IPV6_FREEBIND)
            if address == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        else:
            _try_setsockopt(sock, socket.IPPROTO_IP, IP_FREEBIND)
            if address == "0.0.0.0":
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        sock.bind((address, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
