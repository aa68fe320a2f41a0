"""Listening sockets: bind options a node proxy depends on."""

from __future__ import annotations

import socket

import pytest

from lbd.net.sockets import bind_tcp_listener
from tests.support import fresh_ip

# TEST-NET-1 (RFC 5737): never configured on a host. Only bound here, never sent to.
NOT_ON_THIS_HOST = "192.0.2.77"


def test_freebind_lets_a_listener_start_before_its_address_exists() -> None:
    with pytest.raises(OSError, match="Cannot assign requested address"), socket.socket() as plain:
        plain.bind((NOT_ON_THIS_HOST, 0))
    sock = bind_tcp_listener(NOT_ON_THIS_HOST, 0)
    try:
        assert sock.getsockname()[0] == NOT_ON_THIS_HOST
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    finally:
        sock.close()


def test_listener_is_non_blocking_and_reuses_address() -> None:
    sock = bind_tcp_listener(fresh_ip(), 0)
    try:
        assert sock.getblocking() is False
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    finally:
        sock.close()


def test_ipv6_listener_is_v6_only() -> None:
    sock = bind_tcp_listener("::1", 0)
    try:
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        sock.close()


def test_bind_failure_closes_the_socket_and_raises() -> None:
    first = bind_tcp_listener(fresh_ip(), 0)
    try:
        with pytest.raises(OSError, match="Address already in use"):
            bind_tcp_listener(*first.getsockname())
    finally:
        first.close()
