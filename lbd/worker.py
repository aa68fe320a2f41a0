"""One lbd process: runtime, signals, and the ordered shutdown.

Signal handlers only record (``should_exit``; a second signal sets ``force_exit``); the
coroutine below acts on them, in named phases with deadlines:
stop accepting → drain (each connection up to its service's drainTimeout) → close the rest.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from lbd.admin.server import AdminServer, ReloadHook
from lbd.config import ConfigError, load_file
from lbd.config.model import Config
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
    ready: Callable[[Runtime], Awaitable[None]] | None = None,
    state: ShutdownState | None = None,
    config_path: str | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code.

    The admin API starts after the listeners (so /readyz never says ready too early) and stops
    after the last connection has drained (so the drain can be watched through it)."""
    loop = asyncio.get_running_loop()
    state = state or ShutdownState()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, state.on_signal, signum)
    runtime = Runtime(config)
    admin: AdminServer | None = None
    if config.admin.enabled:
        reload = config_reloader(runtime, config_path) if config_path else None
        admin = AdminServer(config.admin, runtime, reload)
    try:
        await runtime.start()
        if admin is not None:
            try:
                await admin.start()
            except BaseException:
                runtime.stop_accepting()
                raise
        log.info(
            "lbd started",
            services=len(config.services),
            listeners=len(runtime.listeners),
            node=config.node.name,
            admin=admin.bound if admin is not None else None,
        )
        if ready is not None:
            await ready(runtime)
        await state.should_exit.wait()
        await shutdown(runtime, state)
    finally:
        if admin is not None:
            await admin.stop()
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)
    return 0


def config_reloader(runtime: Runtime, path: str) -> ReloadHook:
    """``POST /reload``: read ``path`` again and apply it through the runtime."""

    async def reload() -> tuple[int, dict[str, Any]]:
        try:
            new = load_file(path)
        except ConfigError as error:
            runtime.process.reload_failed()
            problems = [str(problem) for problem in error.problems]
            log.warning("reload failed: invalid config", path=path, problems=problems)
            return 422, {"ok": False, "error": "invalid config", "problems": problems}
        apply = getattr(runtime, "reload", None)
        if apply is None:
            runtime.process.reload_failed()
            return 501, {
                "ok": False,
                "error": "the config is valid, but this lbd cannot apply a new config "
                "without a restart yet (no Runtime.reload)",
            }
        result = await apply(new)
        runtime.process.reload_succeeded()
        return 200, {"ok": True, "result": result}

    return reload


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
