"""One lbd process: runtime, signals, and the ordered shutdown.

Signal handlers only record (``should_exit``; a second signal sets ``force_exit``); the
coroutine below acts on them, in named phases with deadlines:
stop accepting → drain (each connection up to its service's drainTimeout) → close the rest.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

import structlog

from lbd.config.model import Config
from lbd.config.watcher import watch_config
from lbd.reload import Reloader
from lbd.runtime import Runtime

log = structlog.get_logger("lbd.worker")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ShutdownState:
    """What the signal handlers record; the worker reads it."""

    def __init__(self) -> None:
        self.should_exit = asyncio.Event()
        self.force_exit = asyncio.Event()

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
) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code.

    ``source`` is the config file's path and the bytes ``config`` was loaded from: with it,
    SIGHUP (and, with ``watch``, any change of the file) reloads the config in place.
    """
    loop = asyncio.get_running_loop()
    state = state or ShutdownState()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, state.on_signal, signum)
    runtime = Runtime(config)
    background: list[asyncio.Task[None]] = []
    try:
        await runtime.start()
        log.info(
            "lbd started",
            services=len(config.services),
            listeners=len(runtime.listeners),
            node=config.node.name,
        )
        if source is not None:
            reloader = Reloader(runtime, *source)
            loop.add_signal_handler(signal.SIGHUP, reloader.request, "SIGHUP")
            background.append(asyncio.create_task(reloader.run()))
            if watch:
                background.append(
                    asyncio.create_task(
                        watch_config(source[0], lambda: reloader.request("file"), state.should_exit)
                    )
                )
        if ready is not None:
            await ready(runtime)
        await state.should_exit.wait()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await shutdown(runtime, state)
    finally:
        for signum in (*STOP_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    return 0


async def shutdown(runtime: Runtime, state: ShutdownState) -> None:
    open_now = len(runtime.connections)
    log.info("shutdown: stop accepting", open_connections=open_now)
    runtime.stop_accepting()
    # Not Server.wait_closed(): from Python 3.12 it also waits for open connections, which
    # belongs to the drain phase below, under its deadline.
    await asyncio.sleep(0)
    if open_now:
        log.info("shutdown: draining", open_connections=len(runtime.connections))
        drained = asyncio.ensure_future(runtime.drain())
        forced = asyncio.ensure_future(state.force_exit.wait())
        await asyncio.wait({drained, forced}, return_when=asyncio.FIRST_COMPLETED)
        for task in (drained, forced):
            task.cancel()
        await asyncio.gather(drained, forced, return_exceptions=True)
    if len(runtime.connections):
        log.info("shutdown: closing remaining", open_connections=len(runtime.connections))
        runtime.close_all("shutdown")
    # Give the transports one loop turn to send their FINs/RSTs before the loop closes.
    await asyncio.sleep(0)
    log.info("lbd stopped")
