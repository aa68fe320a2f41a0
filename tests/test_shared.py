"""Shared active counts (``lbd.shm.counts``) and the supervisor's channel (``lbd.process.channel``)."""

from __future__ import annotations

import asyncio
import pickle
import random
import socket
import time
import zlib

import pytest

from lbd.config.routes import route_specs
from lbd.endpoints.affinity import SharedAffinityTable
from lbd.endpoints.pool import Pool
from lbd.endpoints.route import Route
from lbd.process import channel as ipc
from lbd.process.channel import Channel
from lbd.shm.affinity_rows import ENTRIES, PROBES, client_key
from lbd.shm.counts import EndpointSlots, SharedCounts, SlotAllocator, admission_key
from tests.support import config, service_yaml, until
from tests.support import document as doc


def two_endpoints(second: bool = True) -> str:
    eps = [("127.0.3.1", 80), ("127.0.3.2", 80)] if second else [("127.0.3.1", 80)]
    return doc(service_yaml("svc", eps, cluster_ip="127.96.3.1", port=80))


def test_each_worker_writes_its_row_and_readers_sum_the_column() -> None:
    region = SharedCounts.create(workers=2, slots=8)
    try:
        first = SharedCounts(region.fd, 2, 8, worker=0)
        second = SharedCounts(region.fd, 2, 8, worker=1)
        first.add(3, 2)
        second.add(3, 5)
        second.add(4, 1)
        assert region.total(3) == 7 and first.total(4) == 1
        region.clear_row(1)  # worker 1 died: its connections died with it
        assert region.total(3) == 2 and region.total(4) == 0
        first.values.release()
        second.values.release()
    finally:
        region.close()


def test_pool_acquire_release_write_the_shared_slot_only() -> None:
    region = SharedCounts.create(workers=2, slots=4)
    try:
        mine = SharedCounts(region.fd, 2, 4, worker=1)
        key = ("default/svc", "80")
        pool = Pool(slots=EndpointSlots(mine, {(key, "127.0.3.1", 80): 2}), route_key=key)
        pool.update([("127.0.3.1", 80, 1), ("127.0.3.2", 80, 1)])
        slotted, unslotted = pool.members
        region.values[2] = 4  # worker 0's connections on the same endpoint
        pool.acquire(slotted)
        pool.acquire(unslotted)
        assert (slotted.active, slotted.active_here) == (5, 1)
        assert (unslotted.active, unslotted.slot) == (1, -1)  # no slot: this process only
        pool.release(slotted)
        assert slotted.active == 4 and region.total(2) == 4
        mine.values.release()
    finally:
        region.close()


def test_slots_are_stable_and_freed_only_when_nobody_counts_on_them() -> None:
    allocator = SlotAllocator(slots=3)
    region = SharedCounts.create(workers=1, slots=3)
    try:
        table = allocator.assign(config(two_endpoints()))
        assert sorted(table.values()) == [0, 1, 2]  # the service port's own, and an endpoint's
        assert admission_key(("default/svc", "80")) in table
        gone = next(key for key in table if key[1] == "127.0.3.2")
        region.values[table[gone]] = 1  # still one connection somewhere: it drains
        assert allocator.assign(config(two_endpoints(False)), region) == table
        region.values[table[gone]] = 0
        assert gone not in allocator.assign(config(two_endpoints(False)), region)
        crowded = doc(
            service_yaml(
                "svc", [(f"127.0.3.{i}", 80) for i in range(1, 5)], cluster_ip="127.96.3.1", port=80
            )
        )
        assert len(allocator.assign(config(crowded))) == 3 and allocator.exhausted == 2
    finally:
        region.close()


async def test_channel_carries_messages_and_sockets() -> None:
    left, right = socket.socketpair()
    got: list[tuple[object, list[socket.socket]]] = []
    closed = asyncio.Event()

    def on_message(message: object, socks: list[socket.socket]) -> None:
        got.append((message, socks))

    sender = Channel(left, lambda m, s: None, lambda: None)
    receiver = Channel(right, on_message, closed.set)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    try:
        sender.send({"type": "big", "data": b"x" * 3_000_000})  # more than one socket buffer
        sender.send({"type": "start", "keys": [("TCP", "127.0.0.1", 1)]}, [listener])
        await until(lambda: len(got) == 2, 10)
        assert [m["type"] for m, _ in got] == ["big", "start"]
        (passed,) = got[1][1]
        assert passed.getsockname() == listener.getsockname()
        passed.close()
        sender.close()
        await asyncio.wait_for(closed.wait(), 5)
    finally:
        listener.close()
        receiver.close()


async def test_channel_delivers_every_frame_then_the_close_after_a_reset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker that exits with bytes unread resets the supervisor's end (ECONNRESET, POLLERR
    under uvloop: one wakeup only). Every frame it sent before must still arrive, then the
    close, even when they take many reads."""
    monkeypatch.setattr(ipc, "RECV_SIZE", 512)  # many reads per wakeup, more than one wakeup
    monkeypatch.setattr(ipc, "READS_PER_WAKEUP", 4)
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    ours.send(b"never read")  # left unread at their close: our end gets ECONNRESET
    frames = [{"type": "metrics", "n": n, "pad": b"x" * 900} for n in range(8)]
    for frame in frames:
        body = pickle.dumps(frame)
        theirs.sendall(ipc.HEADER.pack(len(body), 0) + body)
    theirs.close()
    got: list[object] = []
    closed = asyncio.Event()
    channel = Channel(ours, lambda message, _socks: got.append(message), closed.set)
    try:
        await asyncio.wait_for(closed.wait(), 5)
    finally:
        channel.close()
    assert got == frames


def _worker_route(region: SharedCounts, worker: int, text: str) -> Route:
    """The route of ``text``'s only service port as worker ``worker`` of two would build it."""
    cfg = config(text)
    [spec] = route_specs(cfg).values()
    table = SlotAllocator(slots=8).assign(cfg)
    view = SharedCounts(region.fd, 2, 8, worker=worker)
    return Route(spec, random.Random(worker), EndpointSlots(view, table))


class _Waiter:
    """A connection waiting for admission, as the TCP proxy's Downstream does."""

    external = False

    def __init__(self) -> None:
        self.let_in = asyncio.Event()

    def admitted(self) -> None:
        self.let_in.set()

    def finish(self, reason: str, *, abort: bool = False) -> None:
        raise AssertionError(f"refused: {reason}")


async def test_max_connections_and_its_queue_hold_across_workers() -> None:
    """maxConnections counts every worker's connections (one shared slot per service port),
    and a connection queued in one worker goes on when a connection ends in another."""
    limits = "    maxConnections: 2\n    maxQueue: 4\n    queueTimeout: 10s\n"
    text = doc(
        service_yaml("svc", [("127.0.3.1", 80)], cluster_ip="127.96.3.1", port=80, extra=limits)
    )
    region = SharedCounts.create(workers=2, slots=8)
    first, second = (_worker_route(region, worker, text).admission for worker in (0, 1))
    try:
        assert first is not None and second is not None
        assert first.request(_Waiter()) is True
        assert second.request(_Waiter()) is True
        assert first.admitted == second.admitted == 2
        queued = _Waiter()
        assert second.request(queued) is None  # 2 in all: the third waits in its own worker
        first.release()  # a connection of the other worker ends
        await asyncio.wait_for(queued.let_in.wait(), 5)
        assert first.active == 0 and second.active == 2 and first.admitted == 2
    finally:
        for admission in (first, second):
            if admission is not None and admission.shared is not None:
                admission.shared.values.release()
                admission.shared.affinity.release()
        region.close()


def test_client_ip_affinity_holds_across_workers() -> None:
    """sessionAffinity with several workers: whichever worker accepts a client's connection,
    the client keeps the endpoint the first pick gave it."""
    eps = [(f"127.0.3.{i}", 80) for i in range(1, 7)]
    text = doc(
        service_yaml(
            "svc",
            eps,
            cluster_ip="127.96.3.1",
            port=80,
            strategy="random",
            extra="    sessionAffinity: ClientIP\n",
        )
    )
    region = SharedCounts.create(workers=2, slots=8)
    routes = [_worker_route(region, worker, text) for worker in (0, 1)]
    try:
        assert all(isinstance(route.affinity, SharedAffinityTable) for route in routes)
        for client in [f"127.0.9.{i}" for i in range(1, 41)]:
            picks = set()
            for turn in range(6):
                route = routes[turn % 2]
                endpoint = route.pick(route.pool.eligible(), client, time.monotonic())
                assert endpoint is not None
                picks.add((endpoint.address, endpoint.port))
            assert len(picks) == 1, (client, picks)
        # The endpoint goes away in both workers: the client is re-balanced, and sticks again.
        client = "127.0.9.1"
        first = routes[0].pick(routes[0].pool.eligible(), client, time.monotonic())
        assert first is not None
        rest = [ep for ep in eps if ep != (first.address, first.port)]
        for route in routes:
            route.pool.update([(a, p, 1) for a, p in rest])
        again = {
            (e.address, e.port)
            for route in routes
            for e in [route.pick(route.pool.eligible(), client, time.monotonic())]
            if e is not None
        }
        assert len(again) == 1 and (first.address, first.port) not in again
    finally:
        for route in routes:
            route.affinity = None
        region.close()


def test_the_first_pick_wins_when_two_workers_raced() -> None:
    region = SharedCounts.create(workers=2, slots=8)
    try:
        first, second = (SharedCounts(region.fd, 2, 8, worker=w).affinity for w in (0, 1))
        client = client_key("127.0.9.7")
        assert first.write(11, client, slot=3, now=100.0, timeout=10)
        assert second.write(11, client, slot=5, now=100.5, timeout=10)
        assert sorted(region.affinity.find(11, client, now=101.0, timeout=10)) == [
            (100.0, 3),
            (100.5, 5),
        ]
        assert region.affinity.find(12, client, now=101.0, timeout=10) == []  # another port
        assert region.affinity.find(11, client, now=120.0, timeout=10) == []  # expired
        first.clear(11, client)
        assert region.affinity.find(11, client, now=101.0, timeout=10) == [(100.5, 5)]
        for view in (first, second):
            view.release()
    finally:
        region.close()


def test_a_full_neighbourhood_keeps_the_entry_local() -> None:
    region = SharedCounts.create(workers=1, slots=8)
    try:
        rows = SharedCounts(region.fd, 1, 8, worker=0).affinity
        client = client_key("127.0.9.8")
        start = zlib.crc32(client, 11) % ENTRIES
        others = [client_key(f"127.1.{i // 250}.{i % 250}") for i in range(60000)]
        taken = 0
        for other in others:  # fill every cell the client may use with live entries
            if (zlib.crc32(other, 11) % ENTRIES) in {(start + i) % ENTRIES for i in range(PROBES)}:
                taken += rows.write(11, other, slot=1, now=100.0, timeout=10)
            if taken == PROBES:
                break
        assert taken == PROBES
        assert not rows.write(11, client, slot=2, now=100.0, timeout=10)
        assert rows.write(11, client, slot=2, now=111.0, timeout=10)  # the others expired
        rows.release()
    finally:
        region.close()
