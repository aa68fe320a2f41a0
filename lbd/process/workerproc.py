"""One supervised worker process: ``python -m lbd.process.workerproc --channel FD ...``.

It serves the supervisor's listening sockets (received with the config over the channel) and
answers the supervisor's messages: reload (same bytes in every worker, new sockets attached),
snapshot (metrics), admin (a view or an endpoint override). It stops on SIGTERM like a single
lbd (drain, then close), and also when the channel closes: a supervisor that died must not
leave workers serving on their own. SIGINT and SIGHUP are ignored: a terminal's Ctrl+C reaches
the supervisor, which stops the workers in order, and reloads come from the supervisor only.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import signal
import socket
import sys

import structlog

from lbd.admin import views
from lbd.config import ConfigError, load_text
from lbd.config.loader import LoadOptions
from lbd.config.routes import RouteKey
from lbd.health.registry import CheckKey, HealthRegistry
from lbd.net.loops import LOOP_FACTORIES
from lbd.net.sockets import InheritedSockets
from lbd.observability.logging import configure_logging
from lbd.process.channel import Channel, ChannelClosed
from lbd.process.messages import (
    Acknowledged,
    AdminReply,
    AdminRequest,
    Ejection,
    Handlers,
    HealthVerdict,
    Ready,
    Reload,
    ReloadDone,
    SnapshotReply,
    SnapshotRequest,
    SocketKey,
    Start,
    StartFailed,
    SuccessorServes,
    UdpSocketsReply,
    UdpSocketsRequest,
    dispatch,
)
from lbd.process.udp_handoff import udp_sockets
from lbd.process.worker import ShutdownState, serve
from lbd.runtime.reload import Reloader
from lbd.runtime.runtime import ListenerError, Runtime
from lbd.shm.counts import EndpointSlots, SharedCounts

log = structlog.get_logger("lbd.process.workerproc")

EXIT_START = 3


class WorkerProcess:
    def __init__(self, channel_sock: socket.socket, counts: SharedCounts) -> None:
        self.counts = counts
        self.state = ShutdownState()
        self.started: asyncio.Future[Start] = asyncio.get_running_loop().create_future()
        self.sockets = InheritedSockets()
        self.slots = EndpointSlots(counts, {})
        self.slots.announce_ejection = self._report_ejection
        self.runtime: Runtime | None = None
        self.reloader: Reloader | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        # Verdicts of the probing worker that arrived before our runtime existed.
        self.health_known: dict[CheckKey, bool] = {}
        handlers: Handlers = {
            Start: self._start,
            Reload: self._reload,
            HealthVerdict: self._health,
            Ejection: self._ejection,
            SnapshotRequest: self._snapshot,
            AdminRequest: self._admin,
            UdpSocketsRequest: self._udp_sockets,
            SuccessorServes: self._successor_serves,
        }
        self.channel = Channel(channel_sock, functools.partial(dispatch, handlers), self.on_close)

    def on_close(self) -> None:
        if not self.state.should_exit.is_set():
            log.warning("supervisor gone, stopping")
        self.state.should_exit.set()
        if not self.started.done():
            self.started.set_exception(ChannelClosed("supervisor gone before start"))

    def _attach(self, keys: list[SocketKey], sockets: list[socket.socket]) -> None:
        for key, sock in zip(keys, sockets, strict=True):
            self.sockets.add(key, sock)

    def _start(self, message: Start, sockets: list[socket.socket]) -> None:
        self._attach(message.keys, sockets)
        self.slots.table = message.slots
        if not self.started.done():
            self.started.set_result(message)

    def _reload(self, message: Reload, sockets: list[socket.socket]) -> None:
        self._attach(message.keys, sockets)
        self.slots.table = message.slots
        # Control-plane work: one task per reload, not on the data path.
        task = asyncio.ensure_future(self._reloaded(message))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _reloaded(self, message: Reload) -> None:
        assert self.reloader is not None
        result = await self.reloader.reload(message.reason, message.data)
        self.sockets.close()  # sockets sent for listeners this reload did not bind
        self._send(
            ReloadDone(id=message.id, outcome=result.outcome, problems=list(result.problems))
        )

    def _health(self, message: HealthVerdict, sockets: list[socket.socket]) -> None:
        self.health_known[message.key] = message.healthy
        if self.runtime is not None:
            self.runtime.health.follow(message.key, message.healthy)

    def _ejection(self, message: Ejection, sockets: list[socket.socket]) -> None:
        """Another worker ejected an endpoint: eject it here too, if this worker has it."""
        route = self.runtime.routes.get(message.route) if self.runtime is not None else None
        if route is None or route.outlier is None:
            return
        endpoint = route.pool.member((message.address, message.port))
        if endpoint is not None:
            route.outlier.follow(endpoint, message.seconds)

    def _snapshot(self, message: SnapshotRequest, sockets: list[socket.socket]) -> None:
        if self.runtime is not None:
            self._send(SnapshotReply(id=message.id, snapshot=self.runtime.metrics_snapshot()))

    def _admin(self, message: AdminRequest, sockets: list[socket.socket]) -> None:
        if self.runtime is None:
            return
        try:
            body = views.call(self.runtime, message.view, message.query)
        except views.NotFound as error:
            self._send(AdminReply(id=message.id, status=404, error=str(error)))
        except views.BadRequest as error:
            self._send(AdminReply(id=message.id, status=400, error=str(error)))
        else:
            self._send(AdminReply(id=message.id, status=200, body=body))

    def _udp_sockets(self, message: UdpSocketsRequest, sockets: list[socket.socket]) -> None:
        """A seamless restart: our own UDP sockets, for our successor (as copies)."""
        copies = udp_sockets(self.runtime) if self.runtime is not None else {}
        try:
            if not self.channel.closed:
                self.channel.send(
                    UdpSocketsReply(id=message.id, keys=list(copies)), [*copies.values()]
                )
                self.channel.flush_blocking()  # sent: the copies may close
        finally:
            for sock in copies.values():
                sock.close()

    def _successor_serves(self, message: SuccessorServes, sockets: list[socket.socket]) -> None:
        self.state.successor = frozenset(message.keys)  # read when SIGTERM comes
        self._send(Acknowledged(id=message.id))

    def _send(self, message: object) -> None:
        if not self.channel.closed:
            self.channel.send(message)

    def _report_health(self, key: CheckKey, healthy: bool) -> None:
        self._send(HealthVerdict(key, healthy))

    def _report_ejection(self, route: RouteKey, address: str, port: int, seconds: float) -> None:
        self._send(Ejection(route, address, port, seconds))

    async def run(self) -> int:
        start = await self.started
        options = LoadOptions(start.node_name, start.proxy_name)
        config = load_text(start.data, start.path, options)
        self.runtime = Runtime(
            config,
            sockets=self.sockets,
            slots=self.slots,
            udp_reuse_port=True,
            shared_listeners=True,
        )
        # Health: worker 0 probes and reports transitions; the others follow (start included).
        probing = start.index == 0
        self.runtime.health = HealthRegistry(probing=probing, on_transition=self._report_health)
        for key, healthy in {**start.health, **self.health_known}.items():
            self.runtime.health.follow(key, healthy)
        self.reloader = Reloader(self.runtime, start.path, start.data, options)

        async def ready(runtime: Runtime) -> None:
            self.sockets.close()
            self._send(Ready(os.getpid()))

        try:
            return await serve(
                config, runtime=self.runtime, ready=ready, state=self.state, admin_api=False
            )
        finally:
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)


async def main_async(channel_fd: int, counts: SharedCounts) -> int:
    worker = WorkerProcess(socket.socket(fileno=channel_fd), counts)
    try:
        return await worker.run()
    except (ListenerError, ConfigError, ChannelClosed) as error:
        message = str(error)
        if isinstance(error, ConfigError):
            message = "; ".join(str(problem) for problem in error.problems)
        log.error("worker failed to start", error=message)
        if not worker.channel.closed:
            worker.channel.send(StartFailed(message))
            await asyncio.sleep(0.05)  # let the message leave before the process does
        return EXIT_START
    finally:
        worker.channel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lbd-worker")
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--counts", type=int, required=True, help="shared counters memfd")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--slots", type=int, required=True)
    parser.add_argument("--loop", choices=list(LOOP_FACTORIES), default="uvloop")
    parser.add_argument("--log-format", default="json")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    configure_logging(args.log_format, args.log_level)
    structlog.contextvars.bind_contextvars(worker=args.index)
    counts = SharedCounts(args.counts, args.workers, args.slots, worker=args.index)
    with asyncio.Runner(loop_factory=LOOP_FACTORIES[args.loop]) as runner:
        return runner.run(main_async(args.channel, counts))


if __name__ == "__main__":
    sys.exit(main())
