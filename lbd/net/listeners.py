"""Listening sockets, bound the way a node proxy needs them."""

from __future__ import annotations

import contextlib
import socket

# Not in Python's socket module before 3.12; values from <linux/in.h> and <linux/in6.h>.
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND = getattr(socket, "IPV6_FREEBIND", 78)
LISTEN_BACKLOG = 4096


def bind_tcp_listener(address: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking listening TCP socket on (address, port).

    IP_FREEBIND lets a ClusterIP or LoadBalancer IP listener start before the address is
    configured on the host, as kube-proxy's rules do. IPv6 sockets are V6ONLY so that ``::``
    never silently takes IPv4 traffic meant for another listener.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    # proto IPPROTO_TCP (not 0) is inherited by accepted sockets; asyncio's transports set
    # TCP_NODELAY only on sockets that say they are TCP.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


def _try_setsockopt(sock: socket.socket, level: int, option: int) -> None:
    # An old kernel without the option: binding then needs the address to exist.
    with contextlib.suppress(OSError):
        sock.setsockopt(level, option, 1)
