"""The supervisor's worker processes: start them, talk to them, replace the ones that exit.

Each worker is a ``python -m lbd.process.workerproc`` child with a channel (a socketpair) and
the shared counters region (a memfd) passed to it. Messages from a worker are dispatched by
type; state every worker must share is relayed to the others: the probing worker's health
verdicts (and kept, for replacements) and outlier ejections. A worker that exits is replaced,
with a doubling backoff while starts do not last; its row of shared counts is cleared, since
its connections died with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from lbd.config.routes import RouteKey
from lbd.health.registry import CheckKey
from lbd.observability.snapshot import WorkerSnapshots
from lbd.observability.stats import SupervisorStats
from lbd.process.channel import Channel
from lbd.process.messages import (
    AdminRequest,
    Ejection,
    Handlers,
    HealthVerdict,
    Ready,
    Reply,
    Request,
    Start,
    StartFailed,
    UdpSocketsReply,
    dispatch,
)
from lbd.shm.counts import SharedCounts

log = structlog.get_logger("lbd.process.supervisor")

RESTART_BACKOFF_S = (0.1, 10.0)  # first delay, cap; doubles per start that did not last
STABLE_AFTER_S = 10.0  # a worker up this long resets its slot's backoff
StartMessage = Callable[[int], tuple[Start, list[socket.socket]]]


class StartError(Exception):
    """A worker could not start (it said why) while lbd was starting."""


@dataclass(eq=False)
class WorkerSlot:
    index: int
    process: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    ready: asyncio.Future[int] | None = None  # the worker's pid once it serves
    started_at: float = 0.0
    failures: int = 0  # consecutive starts that did not last
    monitor: asyncio.Task[None] | None = None
    stopping: bool = False
    pending: dict[int, asyncio.Future[Reply]] = field(default_factory=dict)

    @property
    def serving(self) -> bool:
        return (
            self.ready is not None
            and self.ready.done()
            and not self.ready.exception()
            and self.channel is not None
            and not self.channel.closed
        )


class Overrides:
    """The admin overrides (drain, enable, weight) a replacement worker must replay.

    Only the latest of each kind (weight, or drain/enable) and target is kept, and a new one
    moves to the end: replaying them in order leaves every endpoint as the whole history did
    (the last change that touched an endpoint is always kept, in its place relative to the
    other kept ones), and the list stays bounded by the endpoints, not the requests.
    """

    __slots__ = ("latest",)

    def __init__(self) -> None:
        self.latest: dict[tuple[str, str, str, str], AdminRequest] = {}

    def made(self, request: AdminRequest) -> None:
        query = request.query
        kind = "weight" if request.view == "weight" else "drained"
        key = (kind, query.get("service", ""), query.get("port", ""), query.get("endpoint", ""))
        self.latest.pop(key, None)
        self.latest[key] = request

    def __iter__(self) -> Iterator[AdminRequest]:
        return iter(self.latest.values())

    def __len__(self) -> int:
        return len(self.latest)


class WorkerSet:
    def __init__(
        self,
        count: int,
        worker_args: list[str],
        counts: SharedCounts,
        start_message: StartMessage,
        stopping: asyncio.Event,
    ) -> None:
        self.worker_args = worker_args  # --loop/--log-format/--log-level for every worker
        self.counts = counts
        self.start_message = start_message  # what a (re)started worker gets: config, sockets
        self.stopping = stopping
        self.members = [WorkerSlot(i) for i in range(count)]
        self.stats = SupervisorStats()
        self.snapshots = WorkerSnapshots()
        # Admin overrides, replayed to a worker that replaces one.
        self.overrides = Overrides()
        # Faults added over the admin API, by id, with their service port: replayed too.
        self.faults: dict[str, tuple[RouteKey, AdminRequest]] = {}
        # Health verdicts of the probing worker (0), for the others and for replacements.
        self.health: dict[CheckKey, bool] = {}
        self._ids = itertools.count(1)

    def faults_changed(self, request: AdminRequest, body: dict[str, Any]) -> None:
        """Every worker applied a fault change (``lbd.admin.fault_views``): remember what a
        replacement must be told."""
        if request.view == "fault_add":
            self.faults[body["id"]] = ((body["service"], body["port"]), request)
        for removed in body.get("removed", ()):
            self.faults.pop(removed["id"], None)

    def forget_faults(self, routes: set[RouteKey]) -> None:
        """A reload removed these service ports, and their faults with them."""
        for fault_id, (route, _) in list(self.faults.items()):
            if route in routes:
                del self.faults[fault_id]

    def serving(self) -> list[WorkerSlot]:
        return [m for m in self.members if m.serving]

    async def spawn(self, member: WorkerSlot) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            member.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "lbd.process.workerproc",
                f"--channel={theirs.fileno()}",
                f"--counts={self.counts.fd}",
                f"--index={member.index}",
                f"--workers={len(self.members)}",
                f"--slots={self.counts.slots}",
                *self.worker_args,
                pass_fds=(theirs.fileno(), self.counts.fd),
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl+C reaches the supervisor only
            )
        finally:
            theirs.close()
        member.ready = asyncio.get_running_loop().create_future()
        member.started_at = time.monotonic()
        member.channel = Channel(
            ours,
            functools.partial(dispatch, self._handlers(member)),
            functools.partial(self._channel_closed, member),
        )
        member.channel.send(*self.start_message(member.index))
        log.info("worker started", worker=member.index, pid=member.process.pid)

    def _handlers(self, member: WorkerSlot) -> Handlers:
        def ready(message: Ready, socks: list[socket.socket]) -> None:
            if member.ready is not None and not member.ready.done():
                member.ready.set_result(message.pid)
            for override in (*self.overrides, *(added for _, added in self.faults.values())):
                self.send(member, override)

        def failed(message: StartFailed, socks: list[socket.socket]) -> None:
            if member.ready is not None and not member.ready.done():
                member.ready.set_exception(StartError(message.error))

        def health(message: HealthVerdict, socks: list[socket.socket]) -> None:
            self.health[message.key] = message.healthy
            self.relay(member, message)

        def ejection(message: Ejection, socks: list[socket.socket]) -> None:
            self.relay(member, message)  # outlier ejections are global, as health is

        def reply(message: Reply, socks: list[socket.socket]) -> None:
            future = member.pending.pop(message.id, None)
            if future is None or future.done():
                for sock in socks:
                    sock.close()  # an answer nobody waits for any more
            elif isinstance(message, UdpSocketsReply):  # its sockets travel beside it
                future.set_result(dataclasses.replace(message, sockets=socks))
            else:
                future.set_result(message)

        handlers: Handlers = {
            Ready: ready,
            StartFailed: failed,
            HealthVerdict: health,
            Ejection: ejection,
        }
        for kind in Reply.__subclasses__():
            handlers[kind] = reply
        return handlers

    def relay(self, source: WorkerSlot, message: object) -> None:
        """To every other worker (starting ones too: it follows their start message)."""
        for other in self.members:
            if other is not source:
                self.send(other, message)

    def _channel_closed(self, member: WorkerSlot) -> None:
        for future in member.pending.values():
            if not future.done():
                future.set_exception(ConnectionError(f"worker {member.index} exited"))
        member.pending.clear()

    def send(
        self, member: WorkerSlot, message: object, socks: list[socket.socket] | None = None
    ) -> None:
        if member.channel is not None and not member.channel.closed:
            member.channel.send(message, socks)

    async def ask(
        self,
        member: WorkerSlot,
        request: Request,
        wait_s: float,
        socks: list[socket.socket] | None = None,
    ) -> Reply:
        """Send ``request`` and wait for the worker's reply to it."""
        ident = next(self._ids)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        member.pending[ident] = future
        try:
            self.send(member, _with_id(request, ident), socks)
            return await asyncio.wait_for(future, wait_s)
        finally:
            member.pending.pop(ident, None)

    async def monitor(self, member: WorkerSlot) -> None:
        """Wait for the worker to exit; replace it unless lbd is stopping."""
        while True:
            assert member.process is not None
            code = await member.process.wait()
            if member.channel is not None:
                member.channel.close()
            if member.ready is not None and not member.ready.done():
                member.ready.set_exception(StartError(f"worker exited with code {code}"))
            self.snapshots.retire(member.index)
            # Nobody decrements a dead worker's counts: its connections died with it.
            self.counts.clear_row(member.index)
            if self.stopping.is_set() or member.stopping:
                log.info("worker stopped", worker=member.index, code=code)
                return
            lasted = time.monotonic() - member.started_at
            member.failures = 0 if lasted >= STABLE_AFTER_S else member.failures + 1
            first, cap = RESTART_BACKOFF_S
            delay = min(cap, first * 2 ** max(0, member.failures - 1))
            self.stats.worker_restarts_total += 1
            log.error(
                "worker exited, restarting",
                worker=member.index,
                code=code,
                lasted_s=round(lasted, 1),
                restart_in_s=delay,
                restarts=self.stats.worker_restarts_total,
            )
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
                return
            except TimeoutError:
                pass
            await self.spawn(member)

    def signal(self, signum: int) -> None:
        for member in self.members:
            process = member.process
            if process is not None and process.returncode is None:
                process.send_signal(signum)  # our own child, by PID

    async def stop(self) -> None:
        """Stop every worker (one SIGTERM each: they drain) and wait for them."""
        self.signal(signal.SIGTERM)
        processes = [m.process for m in self.members if m.process is not None]
        await asyncio.gather(*(p.wait() for p in processes))
        monitors = [m.monitor for m in self.members if m.monitor is not None]
        await asyncio.gather(*monitors, return_exceptions=True)
        for member in self.members:
            if member.channel is not None:
                member.channel.close()


def _with_id(request: Request, ident: int) -> Request:
    return dataclasses.replace(request, id=ident)
