"""UDP listening sockets across a seamless restart (``lbd.process.handoff``).

A TCP listening socket has one queue of connections: whichever process accepts one owns it,
so the old lbd simply stops accepting. A UDP socket has one queue of datagrams, and sessions
that live in the process that read their first datagram. So:

- The successor gets the very socket (never binds a second one: that fails without
  SO_REUSEPORT, and with it would split the datagrams between two queues), and reads it from
  the moment it serves. The old lbd reads it until the successor says it serves, then stops
  and lets its sessions finish (``hand_over_udp``, ``lbd.net.udp_drain``): their replies leave
  through its copy of the socket. No datagram waits in a queue nobody reads.
- With workers each worker binds its own socket per listener with SO_REUSEPORT, and the
  kernel hashes each client address to one socket of the group. Worker i's socket is copy i
  of its listener (``lbd.net.sockets.copy_key``, as the TCP copies the supervisor keeps) and
  goes to the successor's worker i (``collect``, ``WorkerSockets``): the group and the hashing
  do not change, so a client's datagrams keep reaching the same queue, read by the new worker.
  A successor with more workers binds the extra ones (they join the group); with fewer, the
  sockets nobody took close with the old workers (clients hashed to them move to another
  socket; what was queued there is lost). A single-process successor reads copy 0. A single
  process's socket has no SO_REUSEPORT: a successor with workers cannot bind their further
  sockets, fails, and the old lbd serves on.

Sockets leave a process as copies (``dup``), closed once sent.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Collection, Iterable

import structlog

from lbd.config.model import ListenerSpec
from lbd.net.sockets import InheritedSockets, copy_key, copy_of
from lbd.net.udp_drain import UdpDrain
from lbd.net.udp_listener import UdpListener
from lbd.process.messages import (
    Acknowledged,
    SocketKey,
    SuccessorServes,
    UdpSocketsReply,
    UdpSocketsRequest,
)
from lbd.process.workers import WorkerSet
from lbd.runtime.runtime import Runtime

log = structlog.get_logger("lbd.process.handoff")

ASK_TIMEOUT_S = 5.0


def udp_sockets(runtime: Runtime) -> dict[SocketKey, socket.socket]:
    """Copies of the open UDP listening sockets, by ListenerSpec identity."""
    return {
        key: listener.sock.dup()
        for key, listener in runtime.listeners.items()
        if listener.spec.protocol == "UDP" and listener.sock is not None and not listener.removed
    }


def hand_over_udp(runtime: Runtime, keys: Collection[SocketKey]) -> list[UdpDrain]:
    """Stop reading the UDP sockets a successor serves (``keys``); their sessions drain."""
    drains = []
    for key, listener in runtime.listeners.items():
        net = listener.net
        if key in keys and isinstance(net, UdpListener):
            drain = net.hand_over()
            if drain is not None:
                drains.append(drain)
    if drains:
        sessions = sum(len(drain.sessions) for drain in drains)
        log.info(
            "restart: the next lbd reads the UDP sockets", sockets=len(drains), sessions=sessions
        )
    return drains


async def collect(pool: WorkerSet) -> dict[SocketKey, socket.socket]:
    """The supervisor's part: every serving worker's UDP sockets, worker i's as copy i.
    A worker that does not answer in time keeps its own (the successor's binds new ones)."""
    serving = pool.serving()
    replies = await asyncio.gather(
        *(pool.ask(m, UdpSocketsRequest(), ASK_TIMEOUT_S) for m in serving), return_exceptions=True
    )
    sockets: dict[SocketKey, socket.socket] = {}
    for member, reply in zip(serving, replies, strict=True):
        if not isinstance(reply, UdpSocketsReply):
            log.warning("restart: no UDP sockets from a worker", worker=member.index)
            continue
        for key, sock in zip(reply.keys, reply.sockets, strict=True):
            sockets[copy_key(key, member.index)] = sock
    return sockets


async def successor_serves(pool: WorkerSet, taken: Collection[SocketKey]) -> None:
    """Tell each worker which of its UDP sockets the successor took, before it is stopped."""
    asks = []
    copies = [copy_of(key) for key in taken]
    for member in pool.serving():
        keys = [key for key, number in copies if number == member.index]
        asks.append(pool.ask(member, SuccessorServes(keys=keys), ASK_TIMEOUT_S))
    for answer in await asyncio.gather(*asks, return_exceptions=True):
        if not isinstance(answer, Acknowledged):
            log.warning("restart: a worker did not acknowledge", error=repr(answer))


class WorkerSockets:
    """The successor's supervisor: the UDP sockets its predecessor's workers served, each for
    the worker of the same index here, until every worker has started."""

    def __init__(self, inherited: InheritedSockets, specs: Iterable[ListenerSpec]) -> None:
        self.by_worker: dict[int, dict[SocketKey, socket.socket]] = {}
        udp = {spec.identity for spec in specs if spec.protocol == "UDP"}
        for handed in list(inherited.sockets):
            key, number = copy_of(handed)
            sock = inherited.take(handed) if key in udp else None
            if sock is not None:
                self.by_worker.setdefault(number, {})[key] = sock

    def for_worker(self, index: int) -> tuple[list[SocketKey], list[socket.socket]]:
        mine = self.by_worker.get(index, {})
        return list(mine), list(mine.values())

    def close(self) -> None:
        """Every worker has them (its start message was read), or will never need them."""
        for sockets in self.by_worker.values():
            for sock in sockets.values():
                sock.close()
        self.by_worker.clear()
