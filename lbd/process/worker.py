"""One lbd process: runtime, signals, and the ordered shutdown.

Signal handlers only record (``should_exit``; a second signal sets ``force_exit``); the
coroutine below acts on them, in named phases with deadlines:
stop accepting → drain (each connection up to its service's drainTimeout) → close the rest.
"""

from __future__ import annotations

import asyncio
import functools
import resource
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from lbd.admin.server import AdminServer, ReloadHook
from lbd.config.loader import LoadOptions
from lbd.config.model import Config
from lbd.net.sockets import copy_key
from lbd.net.udp_drain import UdpDrain
from lbd.process.handoff import ADMIN_KEY, Restart
from lbd.process.kube_mode import KubeMode
from lbd.process.messages import SocketKey
from lbd.process.sdnotify import ServiceNotifier
from lbd.process.udp_handoff import hand_over_udp
from lbd.runtime.reload import Reloader
from lbd.runtime.runtime import Runtime
from lbd.runtime.status import ReloadResult
from lbd.sources.file import watch_config
from lbd.sources.kubernetes import KubernetesSource

log = structlog.get_logger("lbd.process.worker")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
WATCH_START_TIMEOUT_S = 10.0
GIL_SWITCH_INTERVAL_S = 0.001
# Loop turns between closing the listeners and counting the connections left (see shutdown).
ACCEPTED_SETTLE_TURNS = 3


class ShutdownState:
    """What the signal handlers record; the worker reads it."""

    def __init__(self) -> None:
        self.should_exit = asyncio.Event()
        self.force_exit = asyncio.Event()
        # A seamless restart: the UDP sockets the successor reads now (their sessions drain).
        self.successor: frozenset[SocketKey] = frozenset()

    def on_signal(self, signum: int) -> None:
        if self.should_exit.is_set():
            self.force_exit.set()
        else:
            self.should_exit.set()
        log.info("signal received", signal=signal.Signals(signum).name)


async def serve(
    config: Config,
    *,
    source: tuple[str, bytes] | None = None,
    watch: bool = False,
    ready: Callable[[Runtime], Awaitable[None]] | None = None,
    state: ShutdownState | None = None,
    options: LoadOptions | None = None,
    runtime: Runtime | None = None,
    admin_api: bool = True,
    restart: Restart | None = None,
    kubernetes: KubernetesSource | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code.

    ``source`` is the config file's path and the bytes ``config`` was loaded from: with it,
    SIGHUP, ``POST /reload`` and (with ``watch``) any change of the file reload the config in
    place. A supervised worker passes its own ``runtime`` (inherited sockets, shared counts) and
    ``admin_api=False``: its supervisor serves the admin API and fans reloads out. The admin API
    starts after the listeners (so /readyz never says ready too early) and
    stops after the last connection has drained (so the drain can be watched through it),
    unless a successor took over (``restart``): then the successor serves it already.
    With ``kubernetes`` the services come from that source (``lbd.process.kube_mode``).
    """
    loop = asyncio.get_running_loop()
    # The event loop shares the GIL with a reload's planning thread (lbd.runtime.plan) and the
    # metrics renderer: hand it over every millisecond rather than every five, so a waiting
    # loop gets it back sooner. Only matters while such a thread runs.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    state = state or ShutdownState()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, state.on_signal, signum)
    raise_file_limit()
    loop.set_exception_handler(AcceptErrorFilter())
    restart = restart or Restart(None)
    runtime = runtime or Runtime(config, sockets=restart.inherited)
    reloader = Reloader(runtime, *source, options) if source is not None else None
    control: Reloader | KubeMode | None = reloader
    if kubernetes is not None:
        await kubernetes.open()  # SourceError: no client library or configuration
    if kubernetes is not None and reloader is not None:
        failed = runtime.process.reload_failed
        control = KubeMode(kubernetes, reloader.reload, options or LoadOptions(), failed)
        runtime.kubernetes = kubernetes.stats
    admin: AdminServer | None = None
    if config.admin.enabled and admin_api:
        reload = admin_reload(control.reload) if control else None
        admin = AdminServer(config.admin, runtime, reload)
    background: list[asyncio.Task[None]] = []
    systemd = ServiceNotifier.from_environment(enabled=admin_api)  # not in supervised workers
    try:
        systemd.start(state.should_exit, lambda: restart.handed_off)
        await runtime.start()
        if admin is not None:
            try:
                await admin.start(restart.take_admin())
            except BaseException:
                runtime.stop_accepting()
                raise
        log.info(
            "lbd started" if admin_api else "worker serving",
            services=len(config.services),
            listeners=len(runtime.listeners),
            node=config.node.name,
            admin=admin.bound if admin is not None else None,
        )
        if control is not None and source is not None:
            loop.add_signal_handler(signal.SIGHUP, control.request, "SIGHUP")
            background.append(asyncio.create_task(control.run()))
            if watch:
                on_change = functools.partial(control.request, "file")
                watching = asyncio.Event()
                watcher = watch_config(source[0], on_change, state.should_exit, watching)
                background.append(asyncio.create_task(watcher))
                # Serving includes seeing the next edit: the watch is in place before "ready".
                await asyncio.wait_for(watching.wait(), WATCH_START_TIMEOUT_S)
        if ready is not None:
            await ready(runtime)
        if isinstance(control, KubeMode):
            control.when_synced(systemd.ready)  # ready once the API's state is applied
        else:
            systemd.ready()
        restart.serving(functools.partial(handoff_sockets, runtime, admin), state.should_exit.set)
        await state.should_exit.wait()
        if restart.handed_off and admin is not None:
            await admin.stop(unlink=False)  # the successor answers on it now
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await shutdown(runtime, state, restart.successor_keys | state.successor)
    finally:
        systemd.close()
        restart.close()
        if admin is not None:
            await admin.stop(unlink=not restart.handed_off)
        await runtime.release_addresses(keep=restart.handed_off)
        for signum in (*STOP_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    return 0


async def handoff_sockets(
    runtime: Runtime, admin: AdminServer | None
) -> dict[SocketKey, socket.socket]:
    """What a successor takes over: copies (``dup``) of every listening socket, TCP and UDP,
    each copy a TCP listener accepts from included (``copy_key``), and of the admin socket."""
    sockets = {
        copy_key(key, number): sock.dup()
        for key, listener in runtime.listeners.items()
        if not listener.removed
        for number, sock in enumerate(listener.net.sockets())
    }
    if admin is not None and admin.sock is not None:
        sockets[ADMIN_KEY] = admin.sock.dup()
    return sockets


def admin_reload(reload_config: Callable[[str], Awaitable[ReloadResult]]) -> ReloadHook:
    """``POST /reload``: the same reload as SIGHUP, answered with its outcome."""

    async def reload() -> tuple[int, dict[str, Any]]:
        result = await reload_config("admin")
        body: dict[str, Any] = {
            "ok": result.outcome != "failed",
            "outcome": result.outcome,
            "durationMs": round(result.duration_s * 1000, 1),
        }
        if result.diff is not None:
            body["changes"] = result.diff.summary()
        if result.problems:
            body["error"] = "the new config was not applied; the running config is unchanged"
            body["problems"] = list(result.problems)
        return (422 if result.outcome == "failed" else 200), body

    return reload


class AcceptErrorFilter:
    """asyncio's loop reports an EMFILE at accept through the exception handler (and then
    pauses accepting for a second): count it and log it at most once a second."""

    def __init__(self) -> None:
        self.accept_errors_total = 0
        self._logged_at = float("-inf")

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != "socket.accept() out of system resource":
            loop.default_exception_handler(context)
            return
        self.accept_errors_total += 1
        now = loop.time()
        if now - self._logged_at >= 1.0:
            self._logged_at = now
            log.error(
                "out of file descriptors",
                where="accept",
                error=str(context.get("exception")),
                accept_errors_total=self.accept_errors_total,
            )


def raise_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit: each proxied connection holds two
    descriptors, and the usual soft default (1024) is far below what a proxy needs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as error:
            log.warning(
                "cannot raise the file descriptor limit", soft=soft, hard=hard, error=str(error)
            )
            return soft
    log.info("file descriptor limit", limit=hard)
    return hard


async def shutdown(
    runtime: Runtime, state: ShutdownState, successor: frozenset[SocketKey] = frozenset()
) -> None:
    """``successor``: the UDP sockets a successor reads now; their sessions drain like
    connections (``lbd.process.udp_handoff``) rather than end with the listener."""
    log.info("shutdown: stop accepting", open_connections=len(runtime.connections))
    udp = hand_over_udp(runtime, successor)
    runtime.stop_accepting()
    # A connection accepted just before the listeners closed reaches connection_made a loop
    # turn or two later (uvloop schedules it; asyncio runs an accept task first). Count only
    # after those turns, or such a connection skips the drain and is reset below.
    # Not Server.wait_closed(): from Python 3.12 it also waits for open connections, which
    # belongs to the drain phase below, under its deadline.
    for _ in range(ACCEPTED_SETTLE_TURNS):
        await asyncio.sleep(0)
    if runtime.connections or udp:
        log.info("shutdown: draining", open_connections=len(runtime.connections))
        drained = asyncio.ensure_future(_drain(runtime, udp))
        forced = asyncio.ensure_future(state.force_exit.wait())
        await asyncio.wait({drained, forced}, return_when=asyncio.FIRST_COMPLETED)
        for task in (drained, forced):
            task.cancel()
        await asyncio.gather(drained, forced, return_exceptions=True)
    for drain in udp:
        drain.close()
    if len(runtime.connections):
        log.info("shutdown: closing remaining", open_connections=len(runtime.connections))
        runtime.close_all("shutdown")
    await runtime.health.wait_closed()
    # Give the transports one loop turn to send their FINs/RSTs before the loop closes.
    await asyncio.sleep(0)
    log.info("lbd stopped")


async def _drain(runtime: Runtime, udp: list[UdpDrain]) -> None:
    await asyncio.gather(runtime.drain(), *(drain.wait() for drain in udp))
