"""``workers: N``: one supervisor process, N worker processes serving every listener.

Listening TCP sockets are bound once, here, and every worker accepts from the same sockets
(measured against one SO_REUSEPORT socket per worker in docs/configuration.md, "Workers"): the
accept queue belongs to the supervisor, so a worker that dies or is replaced loses no queued
connection, a reload binds each new listener once, and a seamless restart hands one set of
sockets to the next lbd. UDP listeners are bound by each worker with SO_REUSEPORT: the kernel
hashes a client's address to one socket, so a client's datagrams keep reaching the worker that
holds its session.

The supervisor also owns what must agree across workers: the config (it reads the file, checks
it, and sends every worker the same bytes), the slot table of the shared active counts
(``lbd.shm.counts``), the summed metrics (``WorkerSnapshots``) and the admin API
(``lbd.process.supervisor_admin``). One watcher (here) reloads everyone
(``lbd.process.reload_fanout``).
Health is probed by worker 0 only; the supervisor relays its transitions to the others, and
each worker's outlier ejections to the rest.

ClientIP affinity is global through the same shared region: each worker publishes its picks in
its own row and reads everyone's (``lbd.shm.affinity_rows``), since a client's connections land
on any worker.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import structlog

from lbd.config.loader import LoadOptions
from lbd.config.model import Config, ListenerSpec, listeners_of
from lbd.net.sockets import InheritedSockets, bind_tcp_listener
from lbd.observability.metrics import Snapshot, WorkerSnapshots
from lbd.observability.stats import KubernetesStats
from lbd.process.channel import Channel, Message
from lbd.process.reload_fanout import ReloadFanOut
from lbd.process.worker import STOP_SIGNALS
from lbd.runtime.reload import ReloadRequests, ReloadResult
from lbd.runtime.runtime import ListenerError
from lbd.runtime.snapshot import kubernetes_values
from lbd.shm.counts import DEFAULT_SLOTS, SharedCounts, SlotAllocator
from lbd.sources.file import watch_config

log = structlog.get_logger("lbd.process.supervisor")

SocketMode = Literal["shared", "reuseport"]
RESTART_BACKOFF_S = (0.1, 10.0)  # first delay, cap; doubles per start that did not last
STABLE_AFTER_S = 10.0  # a worker up this long resets its slot's backoff
START_TIMEOUT_S = 30.0
SNAPSHOT_TIMEOUT_S = 2.0  # a worker slower than this is shown with its last snapshot


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
    pending: dict[int, asyncio.Future[Message]] = field(default_factory=dict)

    @property
    def serving(self) -> bool:
        return (
            self.ready is not None
            and self.ready.done()
            and not self.ready.exception()
            and self.channel is not None
            and not self.channel.closed
        )


class Supervisor(ReloadFanOut):
    def __init__(
        self,
        config: Config,
        source: tuple[str, bytes],
        *,
        workers: int,
        worker_args: list[str],
        socket_mode: SocketMode = "shared",
        inherited: InheritedSockets | None = None,
        options: LoadOptions | None = None,
    ) -> None:
        self.config = config
        self.options = options or LoadOptions()  # --node-name, --proxy-name: every load
        self.path, data = source
        self.data = data
        self.workers = workers
        self.worker_args = worker_args  # --loop/--log-format/--log-level for every worker
        self.socket_mode = socket_mode
        self.inherited = inherited or InheritedSockets()
        self.copies = workers if socket_mode == "reuseport" else 1
        self.sockets: dict[tuple[object, ...], list[socket.socket]] = {}
        self.counts = SharedCounts.create(workers, DEFAULT_SLOTS)
        self.slots = SlotAllocator(DEFAULT_SLOTS)
        self.snapshots = WorkerSnapshots()
        self.slots_table = self.slots.assign(config)
        self.members = [WorkerSlot(i) for i in range(workers)]
        self.restarts = 0  # workers replaced after they exited
        self.overrides: list[tuple[str, dict[str, str]]] = []  # admin changes, for new workers
        # Health verdicts of the probing worker (0), for the others and for replacements.
        self.health: dict[object, bool] = {}
        self.stopping = asyncio.Event()
        self._ids = itertools.count(1)
        self._reload_lock = asyncio.Lock()
        self._reload_requests = ReloadRequests()
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.file_reload: Callable[[str], Awaitable[ReloadResult]] | None = None
        self.kubernetes: KubernetesStats | None = None  # lbd run --kubernetes

    # -- listening sockets -------------------------------------------------------------------

    def _bind(self, specs: list[ListenerSpec]) -> dict[tuple[object, ...], list[socket.socket]]:
        bound: dict[tuple[object, ...], list[socket.socket]] = {}
        try:
            for spec in specs:
                if spec.protocol != "TCP" or spec.identity in self.sockets:
                    continue
                bound[spec.identity] = self._bind_one(spec)
        except OSError as error:
            for socks in bound.values():
                for sock in socks:
                    sock.close()
            raise ListenerError(
                f"cannot bind {spec.describe()} ({spec.kind} of {spec.service}): "
                f"{error.strerror or error}"
            ) from None
        return bound

    def _bind_one(self, spec: ListenerSpec) -> list[socket.socket]:
        inherited = self.inherited.take(spec.identity)
        if inherited is not None:
            return [inherited]
        reuse = self.socket_mode == "reuseport"
        first = bind_tcp_listener(spec.address, spec.port, reuse_port=reuse)
        socks = [first]
        port = first.getsockname()[1]
        try:
            for _ in range(self.copies - 1):
                socks.append(bind_tcp_listener(spec.address, port, reuse_port=True))
        except OSError:
            for sock in socks:
                sock.close()
            raise
        return socks

    def _listener_specs(self, config: Config) -> list[ListenerSpec]:
        return [spec for s in config.services for spec in listeners_of(s, config.node)]

    def _sockets_for(
        self, index: int, socks: dict[tuple[object, ...], list[socket.socket]]
    ) -> tuple[list[tuple[object, ...]], list[socket.socket]]:
        keys = list(socks)
        return keys, [socks[key][index % len(socks[key])] for key in keys]

    def listening_sockets(self) -> dict[tuple[object, ...], socket.socket]:
        """One socket per TCP listener (for a seamless restart: the next lbd takes these)."""
        return {key: socks[0] for key, socks in self.sockets.items()}

    # -- workers -----------------------------------------------------------------------------

    async def _spawn(self, member: WorkerSlot) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            member.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "lbd.process.workerproc",
                f"--channel={theirs.fileno()}",
                f"--counts={self.counts.fd}",
                f"--index={member.index}",
                f"--workers={self.workers}",
                f"--slots={self.counts.slots}",
                *self.worker_args,
                pass_fds=(theirs.fileno(), self.counts.fd),
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl+C reaches the supervisor only
            )
        finally:
            theirs.close()
        loop = asyncio.get_running_loop()
        member.ready = loop.create_future()
        member.started_at = time.monotonic()
        member.channel = Channel(
            ours,
            functools.partial(self._on_message, member),
            functools.partial(self._on_channel_closed, member),
        )
        keys, socks = self._sockets_for(member.index, self.sockets)
        member.channel.send(
            {
                "type": "start",
                "path": self.path,
                "data": self.data,
                "nodeName": self.options.node_name,
                "proxyName": self.options.proxy_name,
                "keys": keys,
                "slots": self.slots_table,
                "index": member.index,
                "health": self.health,
            },
            socks,
        )
        log.info("worker started", worker=member.index, pid=member.process.pid)

    def _on_message(self, member: WorkerSlot, message: Message, socks: list[socket.socket]) -> None:
        for sock in socks:
            sock.close()  # workers never send sockets
        kind = message["type"]
        if kind == "ready":
            if member.ready is not None and not member.ready.done():
                member.ready.set_result(message["pid"])
            for name, query in self.overrides:
                self._send(member, {"type": "admin", "view": name, "query": query})
        elif kind == "health":
            self.health[message["key"]] = message["healthy"]
            for other in self.members:  # starting ones too: it follows their start message
                if other is not member:
                    self._send(other, message)
        elif kind == "eject":  # outlier ejections are global, as health is
            for other in self.members:
                if other is not member:
                    self._send(other, message)
        elif kind == "failed":
            if member.ready is not None and not member.ready.done():
                member.ready.set_exception(StartError(message["error"]))
        else:
            future = member.pending.pop(message.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(message)

    def _on_channel_closed(self, member: WorkerSlot) -> None:
        for future in member.pending.values():
            if not future.done():
                future.set_exception(ConnectionError(f"worker {member.index} exited"))
        member.pending.clear()

    def _send(
        self, member: WorkerSlot, message: Message, socks: list[socket.socket] | None = None
    ) -> int:
        ident = next(self._ids)
        if member.channel is not None and not member.channel.closed:
            member.channel.send({**message, "id": ident}, socks)
        return ident

    async def ask(
        self,
        member: WorkerSlot,
        message: Message,
        wait_s: float,
        socks: list[socket.socket] | None = None,
    ) -> Message:
        """Send ``message`` and wait for the worker's answer to it."""
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        ident = self._send(member, message, socks)
        member.pending[ident] = future
        try:
            return await asyncio.wait_for(future, wait_s)
        finally:
            member.pending.pop(ident, None)

    async def _monitor(self, member: WorkerSlot) -> None:
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
            self.restarts += 1
            log.error(
                "worker exited, restarting",
                worker=member.index,
                code=code,
                lasted_s=round(lasted, 1),
                restart_in_s=delay,
                restarts=self.restarts,
            )
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
                return
            except TimeoutError:
                pass
            await self._spawn(member)

    async def start(self) -> None:
        """Bind the TCP listeners, start every worker, and wait until all serve."""
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self.on_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload, "SIGHUP")
        self.sockets = self._bind(self._listener_specs(self.config))
        self.inherited.close()
        for member in self.members:
            await self._spawn(member)
        waits = [m.ready for m in self.members if m.ready is not None]
        done, pending = await asyncio.wait(waits, timeout=START_TIMEOUT_S)
        failed = [f.exception() for f in done if f.exception() is not None]
        if failed or pending:
            for future in pending:
                future.cancel()
            await self.stop()
            raise StartError(str(failed[0]) if failed else "workers did not start in time")
        for member in self.members:
            member.monitor = asyncio.create_task(self._monitor(member))

    # -- stop ----------------------------------------------------------------------------------

    def on_signal(self, signum: int) -> None:
        log.info("signal received", signal=signal.Signals(signum).name)
        if self.stopping.is_set():
            self._signal_workers(signal.SIGTERM)  # their second: close at once, no more drain
        self.stopping.set()  # ``run`` stops the workers: one SIGTERM each, they drain

    def _signal_workers(self, signum: int) -> None:
        for member in self.members:
            process = member.process
            if process is not None and process.returncode is None:
                process.send_signal(signum)  # our own child, by PID

    async def stop(self) -> None:
        """Stop every worker (each drains its connections) and wait for them."""
        self.stopping.set()
        self._signal_workers(signal.SIGTERM)
        processes = [m.process for m in self.members if m.process is not None]
        await asyncio.gather(*(p.wait() for p in processes))
        monitors = [m.monitor for m in self.members if m.monitor is not None]
        await asyncio.gather(*monitors, return_exceptions=True)
        for member in self.members:
            if member.channel is not None:
                member.channel.close()

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (*STOP_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        for socks in self.sockets.values():
            for sock in socks:
                sock.close()
        self.sockets.clear()
        self.counts.close()

    # -- what the admin API reads ----------------------------------------------------------------

    @property
    def ready(self) -> bool:
        synced = self.kubernetes is None or self.kubernetes.synced
        return synced and not self.stopping.is_set() and any(m.serving for m in self.members)

    async def snapshot(self) -> Snapshot:
        serving = [m for m in self.members if m.serving]
        replies = await asyncio.gather(
            *(self.ask(m, {"type": "snapshot"}, SNAPSHOT_TIMEOUT_S) for m in serving),
            return_exceptions=True,
        )
        for member, reply in zip(serving, replies, strict=True):
            if isinstance(reply, dict):
                self.snapshots.update(member.index, reply["snapshot"])
        total = self.snapshots.total()
        total.add("lbd_workers", (), sum(1 for m in self.members if m.serving))
        total.add("lbd_worker_restarts_total", (), self.restarts)
        if self.kubernetes is not None:
            kubernetes_values(total, self.kubernetes)
        return total

    async def run(self, *, watch: bool) -> int:
        """Serve until SIGTERM/SIGINT (after ``start``); returns the exit code."""
        background = [asyncio.create_task(self.reload_loop())]
        if watch:
            on_change = functools.partial(self.request_reload, "file")
            watcher = watch_config(self.path, on_change, self.stopping)
            background.append(asyncio.create_task(watcher))
        try:
            await self.stopping.wait()
            log.info("shutdown: stopping workers", workers=self.workers)
            await self.stop()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
        log.info("lbd stopped")
        return 0
