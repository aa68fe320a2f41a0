"""The admin API of a supervised lbd, and the supervisor's whole lifetime.

``/metrics`` sums every worker's snapshot; ``/services`` and ``/explain`` are one worker's
view (the endpoints' ``active`` counts are the shared, global ones; the per-service connection
counters there are that worker's, ``/metrics`` has the sums); endpoint overrides go to every
worker and are replayed to a worker that replaces one.
"""

from __future__ import annotations

import asyncio
import socket

import structlog

from lbd.admin import views
from lbd.admin.server import AdminServer
from lbd.config.model import Config
from lbd.observability.metrics import Snapshot
from lbd.process.handoff import ADMIN_KEY, Restart
from lbd.process.kube_mode import KubeMode
from lbd.process.supervisor import Supervisor
from lbd.process.worker import admin_reload
from lbd.sources.kubernetes import KubernetesSource

log = structlog.get_logger("lbd.process.supervisor")

VIEW_TIMEOUT_S = 5.0
OVERRIDES = ("drain", "enable", "weight")


class SupervisorBackend:
    __slots__ = ("supervisor",)

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    @property
    def ready(self) -> bool:
        return self.supervisor.ready

    @property
    def config(self) -> Config:
        return self.supervisor.config

    async def snapshot(self) -> Snapshot:
        return await self.supervisor.snapshot()

    async def view(self, name: str, query: dict[str, str]) -> views.Json:
        serving = [m for m in self.supervisor.members if m.serving]
        if not serving:
            raise views.NotFound("no worker is serving right now")
        targets = serving if name in OVERRIDES else serving[:1]
        message = {"type": "admin", "view": name, "query": query}
        replies = [await self.supervisor.ask(m, message, VIEW_TIMEOUT_S) for m in targets]
        first = replies[0]
        if first["status"] == 404:
            raise views.NotFound(first["error"])
        if first["status"] == 400:
            raise views.BadRequest(first["error"])
        if name in OVERRIDES:
            self.supervisor.overrides.append((name, query))
        body: views.Json = first["body"]
        return body


async def serve_supervised(
    supervisor: Supervisor,
    *,
    watch: bool,
    restart: Restart | None = None,
    kubernetes: KubernetesSource | None = None,
) -> int:
    """Start the workers and the admin API, serve until stopped; returns the exit code.
    With ``kubernetes`` the services come from that source, applied through the fan-out."""
    config = supervisor.config
    if kubernetes is not None:

        def count_failure() -> None:
            supervisor.reloads_failed += 1

        kube = KubeMode(kubernetes, supervisor.reload, supervisor.options, count_failure)
        supervisor.file_reload = kube.reload
        supervisor.kubernetes = kubernetes.stats
    restart = restart or Restart(None)
    admin: AdminServer | None = None
    if config.admin.enabled:
        admin = AdminServer(
            config.admin, SupervisorBackend(supervisor), admin_reload(supervisor.reload)
        )
    admin_sock = restart.take_admin()  # before start() closes what it did not take
    try:
        await supervisor.start()
        if admin is not None:
            try:
                await admin.start(admin_sock)
            except BaseException:
                await supervisor.stop()
                raise
        log.info(
            "lbd started",
            services=len(config.services),
            workers=supervisor.workers,
            node=config.node.name,
            admin=admin.bound if admin is not None else None,
        )

        def sockets() -> dict[tuple[object, ...], socket.socket]:
            handed = supervisor.listening_sockets()
            if admin is not None and admin.sock is not None:
                handed[ADMIN_KEY] = admin.sock
            return handed

        restart.serving(sockets, supervisor.stopping.set)
        following = asyncio.create_task(kubernetes.run()) if kubernetes is not None else None
        try:
            return await supervisor.run(watch=watch)
        finally:
            if following is not None:
                following.cancel()
                await asyncio.gather(following, return_exceptions=True)
    finally:
        restart.close()
        if admin is not None:
            await admin.stop(unlink=not restart.handed_off)
        supervisor.close()
