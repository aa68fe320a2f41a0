"""``workers: N``: one supervisor process, N worker processes serving every listener.

The supervisor owns what must agree across workers, each in an object of its own:
- the listening TCP sockets, bound once and shared by every worker (``ListeningSockets``);
- the workers themselves: start, talk to, replace (``WorkerSet``), which also relays health
  verdicts (worker 0 probes) and outlier ejections between them;
- the config that runs and the slot table of the shared counters, changed by one reload that
  fans out to every worker (``ReloadFanOut``);
- the summed metrics (``WorkerSnapshots``) and, in ``lbd.process.supervisor_admin``, the admin
  API. ClientIP affinity and the active counts are global through the shared memory region
  (``lbd.shm``), since a client's connections land on any worker.

Signal handlers only record (``stopping``); ``run`` acts on them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import signal
import socket

import structlog

from lbd.config.loader import LoadOptions
from lbd.config.model import Config
from lbd.net.addresses import NodeAddresses
from lbd.net.netlink import NetlinkFailure
from lbd.net.sockets import InheritedSockets
from lbd.observability.snapshot import Snapshot, read_stats
from lbd.observability.stats import KubernetesStats
from lbd.process.listening import ListeningSockets, SocketMode, listener_specs
from lbd.process.messages import SnapshotReply, SnapshotRequest, Start
from lbd.process.reload_fanout import ReloadFanOut
from lbd.process.udp_handoff import WorkerSockets
from lbd.process.worker import STOP_SIGNALS
from lbd.process.workers import StartError, WorkerSet
from lbd.runtime.runtime import ListenerError
from lbd.runtime.snapshot import kubernetes_snapshot
from lbd.shm.counts import DEFAULT_SLOTS, SharedCounts, SlotAllocator
from lbd.sources.file import watch_config

log = structlog.get_logger("lbd.process.supervisor")

START_TIMEOUT_S = 30.0
SNAPSHOT_TIMEOUT_S = 2.0  # a worker slower than this is shown with its last snapshot

__all__ = ["StartError", "Supervisor"]


class Supervisor:
    def __init__(
        self,
        config: Config,
        source: tuple[str, bytes],
        *,
        workers: int,
        worker_args: list[str],
        socket_mode: SocketMode = "reuseport",
        inherited: InheritedSockets | None = None,
        options: LoadOptions | None = None,
    ) -> None:
        self.workers = workers
        self.stopping = asyncio.Event()
        self.counts = SharedCounts.create(workers, DEFAULT_SLOTS)
        self.listening = ListeningSockets(workers, socket_mode, inherited or InheritedSockets())
        self.pool = WorkerSet(workers, worker_args, self.counts, self._start, self.stopping)
        # node.manageAddresses: here, where the listeners are bound (workers do not).
        self.addresses = NodeAddresses()
        self.reloads = ReloadFanOut(
            config,
            source,
            options or LoadOptions(),
            self.listening,
            self.pool,
            self.counts,
            SlotAllocator(DEFAULT_SLOTS),
            self.addresses,
        )
        self.kubernetes: KubernetesStats | None = None  # lbd run --kubernetes
        # A seamless restart: the UDP sockets of the predecessor's workers, for ours at start.
        self.predecessor = WorkerSockets(InheritedSockets(), ())

    @property
    def config(self) -> Config:
        return self.reloads.config

    def _start(self, index: int) -> tuple[Start, list[socket.socket]]:
        """What worker ``index`` is started with (also a replacement, at any later time)."""
        reloads = self.reloads
        keys, socks = self.listening.for_worker(index)
        udp_keys, udp_socks = self.predecessor.for_worker(index)  # a seamless restart's
        start = Start(
            path=reloads.path,
            data=reloads.data,
            node_name=reloads.options.node_name,
            proxy_name=reloads.options.proxy_name,
            keys=keys + udp_keys,
            slots=reloads.slots_table,
            index=index,
            health=dict(self.pool.health),
        )
        return start, socks + udp_socks

    async def start(self) -> None:
        """Bind the TCP listeners, start every worker, and wait until all serve."""
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self.on_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self.reloads.request, "SIGHUP")
        try:
            await self.addresses.prepare(self.config)
        except NetlinkFailure as error:
            raise ListenerError(f"node.manageAddresses: {error}") from None
        self.listening.commit(self.listening.bind(listener_specs(self.config)))
        self.predecessor = WorkerSockets(self.listening.inherited, listener_specs(self.config))
        self.listening.inherited.close()
        for member in self.pool.members:
            await self.pool.spawn(member)
        waits = [m.ready for m in self.pool.members if m.ready is not None]
        done, pending = await asyncio.wait(waits, timeout=START_TIMEOUT_S)
        self.predecessor.close()  # every worker that started has its copies
        failed = [f.exception() for f in done if f.exception() is not None]
        if failed or pending:
            for future in pending:
                future.cancel()
            await self.stop()
            raise StartError(str(failed[0]) if failed else "workers did not start in time")
        for member in self.pool.members:
            member.monitor = asyncio.create_task(self.pool.monitor(member))
        self.addresses.commit(self.config)

    def on_signal(self, signum: int) -> None:
        log.info("signal received", signal=signal.Signals(signum).name)
        if self.stopping.is_set():
            self.pool.signal(signal.SIGTERM)  # their second: close at once, no more drain
        self.stopping.set()  # ``run`` stops the workers: one SIGTERM each, they drain

    async def stop(self) -> None:
        """Stop every worker (each drains its connections) and wait for them."""
        self.stopping.set()
        self.addresses.stop_watching()
        await self.pool.stop()

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (*STOP_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        self.listening.close()
        self.predecessor.close()
        self.counts.close()

    @property
    def ready(self) -> bool:
        synced = self.kubernetes is None or self.kubernetes.synced  # lbd run --kubernetes
        return synced and not self.stopping.is_set() and bool(self.pool.serving())

    async def snapshot(self) -> Snapshot:
        serving = self.pool.serving()
        replies = await asyncio.gather(
            *(self.pool.ask(m, SnapshotRequest(), SNAPSHOT_TIMEOUT_S) for m in serving),
            return_exceptions=True,
        )
        snapshots = self.pool.snapshots
        for member, reply in zip(serving, replies, strict=True):
            if isinstance(reply, SnapshotReply):
                snapshots.update(member.index, reply.snapshot)
        total = snapshots.total()
        self.pool.stats.workers = len(serving)
        read_stats(total, "supervisor", self.pool.stats, ())
        read_stats(total, "node", self.addresses.stats, ())
        # Reloads are the supervisor's to count: a file it rejects never reaches a worker.
        reloads = dataclasses.asdict(self.reloads.results)
        total.values["lbd_config_reloads_total"] = {(k,): v for k, v in reloads.items()}
        if self.kubernetes is not None:
            kubernetes_snapshot(total, self.kubernetes)
        return total

    async def run(self, *, watch: bool) -> int:
        """Serve until SIGTERM/SIGINT (after ``start``); returns the exit code."""
        background = [asyncio.create_task(self.reloads.run())]
        if watch:
            on_change = functools.partial(self.reloads.request, "file")
            watcher = watch_config(self.reloads.path, on_change, self.stopping)
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
