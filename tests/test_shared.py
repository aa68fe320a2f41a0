"""Shared active counts (``lbd.shared``) and the supervisor's channel (``lbd.ipc``)."""

from __future__ import annotations

import asyncio
import socket

from lbd.ipc import Channel, Message
from lbd.pool import Pool
from lbd.shared import EndpointSlots, SharedCounts, SlotAllocator
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
    allocator = SlotAllocator(slots=2)
    region = SharedCounts.create(workers=1, slots=2)
    try:
        table = allocator.assign(config(two_endpoints()))
        assert sorted(table.values()) == [0, 1]
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
        assert len(allocator.assign(config(crowded))) == 2 and allocator.exhausted == 2
    finally:
        region.close()


async def test_channel_carries_messages_and_sockets() -> None:
    left, right = socket.socketpair()
    got: list[tuple[Message, list[socket.socket]]] = []
    closed = asyncio.Event()

    def on_message(message: Message, socks: list[socket.socket]) -> None:
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
