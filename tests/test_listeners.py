"""Listening sockets: bind options a node proxy depends on."""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import socket

import pytest

from lbd.net.sockets import InheritedSockets, bind_tcp_listener
from lbd.process.listening import ListeningSockets, listener_specs
from lbd.runtime.runtime import Runtime
from tests.support import (
    address_of,
    config,
    document,
    echo_backend,
    fresh_ip,
    read_name,
    route_of,
    running,
    service_yaml,
    until,
)

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


NEEDS_SS_K = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ss") is None, reason="ss -K needs root"
)


async def destroy(host: str, port: int) -> None:
    """Destroy the listening socket(s) at host:port from outside, as an operator's ss -K."""
    killed = await asyncio.create_subprocess_exec(
        *("ss", "-K", "-t", "state", "listening", "src", f"{host}:{port}"),
        stdout=asyncio.subprocess.DEVNULL,
    )
    assert await asyncio.wait_for(killed.wait(), 10) == 0


async def cpu_while_idle() -> float:
    """Seconds of CPU this process used in half a second of waiting: nothing should spin."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.sleep(0.5)  # a window to measure CPU in
    after = resource.getrusage(resource.RUSAGE_SELF)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


@NEEDS_SS_K
async def test_a_listening_socket_destroyed_from_outside_is_bound_again() -> None:
    """``ss -K`` (or any error that closes a listening socket) left lbd spinning on it at
    ~90 % of a core, logging nothing; now its failing accept says so at once: it is bound
    again and counted, and connections are served at the same address."""
    async with echo_backend("alive") as (bh, bp, _):
        async with running(config(document(service_yaml("svc", [(bh, bp)])))) as runtime:
            host, port = address_of(runtime)
            assert await read_name(host, port) == "alive"
            await destroy(host, port)
            stats = route_of(runtime).stats
            await until(lambda: stats.listener_destroyed_total.TCP == 1, 5, 0.05)
            assert await read_name(host, port) == "alive"
            busy = await cpu_while_idle()
    assert busy < 0.2, f"{busy:.2f} s of CPU in 0.5 s"


@NEEDS_SS_K
async def test_a_destroyed_worker_copy_listens_again_for_the_supervisor_too() -> None:
    """With workers, the supervisor keeps each worker's SO_REUSEPORT copy (here: a
    descriptor of our own for the socket a worker runtime serves). The worker listens on the
    destroyed socket again, so the supervisor's descriptor, which a replacement worker would
    get, is a listening socket again too."""
    async with echo_backend("alive") as (bh, bp, _):
        cfg = config(document(service_yaml("svc", [(bh, bp)])))
        supervisor = ListeningSockets(1, "reuseport", InheritedSockets())
        supervisor.commit(supervisor.bind(listener_specs(cfg)))
        keys, socks = supervisor.for_worker(0)
        inherited = InheritedSockets({k: s.dup() for k, s in zip(keys, socks, strict=True)})
        runtime = Runtime(cfg, sockets=inherited, shared_listeners=True)
        await runtime.start()
        try:
            host, port = address_of(runtime)
            assert await read_name(host, port) == "alive"
            await destroy(host, port)
            stats = route_of(runtime).stats
            await until(lambda: stats.listener_destroyed_total.TCP == 1, 5, 0.05)
            assert await read_name(host, port) == "alive"
            [kept] = socks
            assert kept.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            busy = await cpu_while_idle()
        finally:
            runtime.stop_accepting()
            runtime.close_all("test_teardown")
            supervisor.close()
    assert busy < 0.2, f"{busy:.2f} s of CPU in 0.5 s"
