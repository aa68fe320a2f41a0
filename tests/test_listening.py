"""The supervisor's listening sockets: one SO_REUSEPORT copy per worker, every copy handed
over by a seamless restart, and a successor with another worker count adopting or adding
copies; a single process hands every copy it serves on too, and UDP sockets go to the
worker of their copy number (real sockets, no processes)."""

from __future__ import annotations

import os
import socket

from lbd.config.model import ListenerSpec
from lbd.net.sockets import InheritedSockets, copy_key, copy_of
from lbd.process.listening import ListeningSockets, listener_specs
from lbd.process.udp_handoff import WorkerSockets
from lbd.process.worker import handoff_sockets
from lbd.runtime.runtime import Runtime
from tests.support import config, document, fresh_ip, service_yaml


def bound(workers: int) -> tuple[ListeningSockets, list[ListenerSpec]]:
    specs = listener_specs(config(document(service_yaml("svc", [(fresh_ip(), 80)]))))
    sockets = ListeningSockets(workers, "reuseport", InheritedSockets())
    sockets.commit(sockets.bind(specs))
    return sockets, specs


def ports(socks: list[socket.socket]) -> set[tuple[str, int]]:
    return {s.getsockname()[:2] for s in socks}


def test_each_worker_gets_its_own_copy_of_one_port() -> None:
    sockets, _ = bound(2)
    try:
        [copies] = sockets.sockets.values()
        assert len(copies) == 2 and len(ports(copies)) == 1
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in copies)
        keys0, socks0 = sockets.for_worker(0)
        keys1, socks1 = sockets.for_worker(1)
        assert keys0 == keys1 == list(sockets.sockets)
        assert socks0[0] is not socks1[0]
    finally:
        sockets.close()


def test_a_copy_bound_for_port_0_keeps_its_port_across_shutdown_and_listen() -> None:
    # Workers stop listening by shutdown() and listen again: a socket bound to port 0 would
    # come back on another port.
    sockets, _ = bound(2)
    try:
        [copies] = sockets.sockets.values()
        before = copies[0].getsockname()
        copies[0].shutdown(socket.SHUT_RDWR)
        copies[0].listen(16)
        assert copies[0].getsockname() == before
    finally:
        sockets.close()


def test_a_restart_hands_every_copy_and_a_smaller_successor_adopts_them() -> None:
    old, specs = bound(2)
    try:
        handed = old.handoff()
        [key] = old.sockets
        assert set(handed) == {key, copy_key(key, 1)}
        # The successor (1 worker) takes both: closing one would reset its queued connections.
        new = ListeningSockets(1, "reuseport", InheritedSockets(handed))
        new.commit(new.bind(specs))
        keys, socks = new.for_worker(0)
        assert keys == [key, copy_key(key, 1)]
        assert {s.fileno() for s in socks} == {s.fileno() for s in handed.values()}
    finally:
        old.close()


def test_a_larger_successor_binds_one_more_copy() -> None:
    old, specs = bound(2)
    new = ListeningSockets(3, "reuseport", InheritedSockets(old.handoff()))
    try:
        new.commit(new.bind(specs))
        [copies] = new.sockets.values()
        assert len(copies) == 3 and len(ports(copies)) == 1
        assert [len(new.for_worker(i)[1]) for i in range(3)] == [1, 1, 1]
    finally:
        new.close()
        old.close()


def test_inherited_sockets_without_reuseport_stay_shared() -> None:
    plain = socket.socket()
    plain.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    plain.bind((fresh_ip(), 0))
    plain.listen(16)
    host, port = plain.getsockname()[:2]
    service = service_yaml("svc", [(fresh_ip(), 80)], cluster_ip=host, port=port)
    specs = listener_specs(config(document(service)))
    sockets = ListeningSockets(2, "reuseport", InheritedSockets({specs[0].identity: plain}))
    try:
        sockets.commit(sockets.bind(specs))
        assert sockets.for_worker(0)[1] == sockets.for_worker(1)[1] == [plain]
    finally:
        sockets.close()


def test_copy_keys_name_a_listener_and_a_number() -> None:
    key = ("TCP", "127.0.0.1", 80)
    assert copy_key(key, 0) == key
    assert [copy_of(copy_key(key, n)) for n in range(3)] == [(key, 0), (key, 1), (key, 2)]


async def test_a_single_process_hands_over_every_copy_it_serves_tcp_and_udp() -> None:
    """A single-process lbd that took over from one with two workers accepts from both TCP
    copies; its own restart hands both on (each by its copy number) and its UDP socket."""
    host = fresh_ip()
    tcp = service_yaml("web", [(fresh_ip(), 80)], cluster_ip=host)
    udp = service_yaml("dns", [(fresh_ip(), 53)], cluster_ip=host, protocol="UDP")
    cfg = config(document(tcp, udp))
    workers = ListeningSockets(2, "reuseport", InheritedSockets())
    workers.commit(workers.bind(listener_specs(cfg)))
    runtime = Runtime(cfg, sockets=InheritedSockets(workers.handoff()))
    await runtime.start()
    handed: dict[tuple[object, ...], socket.socket] = {}
    try:
        handed = await handoff_sockets(runtime, None)
        [tcp_key] = workers.sockets
        [udp_key] = [key for key in runtime.listeners if key != tcp_key]
        assert set(handed) == {tcp_key, copy_key(tcp_key, 1), udp_key}
        # Copies (dup) of the very sockets served: same socket, another descriptor.
        served = {os.fstat(s.fileno()).st_ino for s in runtime.listeners[tcp_key].net.sockets()}
        assert {os.fstat(handed[copy_key(tcp_key, n)].fileno()).st_ino for n in (0, 1)} == served
    finally:
        for sock in handed.values():
            sock.close()
        runtime.stop_accepting()
        workers.close()


def test_udp_copies_go_to_the_worker_of_their_number() -> None:
    """Worker i's UDP socket is copy i of its listener: the successor's worker i reads it."""
    cfg = config(document(service_yaml("dns", [(fresh_ip(), 53)], protocol="UDP")))
    [spec] = listener_specs(cfg)
    first, second = socket.socket(type=socket.SOCK_DGRAM), socket.socket(type=socket.SOCK_DGRAM)
    inherited = InheritedSockets({spec.identity: first, copy_key(spec.identity, 1): second})
    by_worker = WorkerSockets(inherited, [spec])
    try:
        assert by_worker.for_worker(0) == ([spec.identity], [first])
        assert by_worker.for_worker(1) == ([spec.identity], [second])
        assert by_worker.for_worker(2) == ([], []) and not inherited.sockets
    finally:
        by_worker.close()
