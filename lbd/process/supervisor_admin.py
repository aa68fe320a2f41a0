"""The admin API of a supervised lbd, and the supervisor's whole lifetime.

``/metrics`` sums every worker's snapshot; ``/services`` and ``/explain`` are one worker's
view (the endpoints' ``active`` counts are the shared, global ones; the per-service connection
counters there are that worker's, ``/metrics`` has the sums); endpoint overrides and fault
changes go to every worker and are replayed to a worker that replaces one.
"""

from __future__ import annotations

import asyncio
import socket

import structlog

from lbd.admin import views
from lbd.admin.fault_views import new_fault_id
from lbd.admin.health import Health
from lbd.admin.server import AdminServer
from lbd.config.model import Config
from lbd.observability.snapshot import Snapshot
from lbd.process import udp_handoff
from lbd.process.handoff import ADMIN_KEY, Restart
from lbd.process.kube_mode import KubeMode
from lbd.process.messages import AdminReply, AdminRequest, SocketKey
from lbd.process.sdnotify import ServiceNotifier
from lbd.process.supervisor import Supervisor
from lbd.process.worker import admin_reload
from lbd.sources.kubernetes import KubernetesSource

log = structlog.get_logger("lbd.process.supervisor")

VIEW_TIMEOUT_S = 5.0
OVERRIDES = ("drain", "enable", "weight")
FAULT_CHANGES = ("fault_add", "fault_remove")


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

    def health(self) -> Health:
        supervisor = self.supervisor
        reloads = supervisor.reloads
        workers = (len(supervisor.pool.serving()), supervisor.workers)
        return Health(
            supervisor.ready, reloads.applied_at, reloads.status, supervisor.kubernetes, workers
        )

    async def view(self, name: str, query: dict[str, str]) -> views.Json:
        pool = self.supervisor.pool
        serving = pool.serving()
        if not serving:
            raise views.NotFound("no worker is serving right now")
        if name == "fault_add" and not query.get("id"):
            query = {**query, "id": new_fault_id()}  # the same id in every worker
        changes = name in OVERRIDES or name in FAULT_CHANGES
        targets = serving if changes else serving[:1]
        request = AdminRequest(view=name, query=query)
        replies = [await pool.ask(m, request, VIEW_TIMEOUT_S) for m in targets]
        first = replies[0]
        assert isinstance(first, AdminReply)
        if first.status == 404:
            raise views.NotFound(first.error)
        if first.status == 400:
            raise views.BadRequest(first.error)
        if name in OVERRIDES:
            pool.overrides.made(request)
        elif name in FAULT_CHANGES:
            pool.faults_changed(request, first.body or {})
        return first.body or {}


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
    reloads = supervisor.reloads
    kube: KubeMode | None = None
    if kubernetes is not None:
        await kubernetes.open()  # SourceError: no client library or configuration

        kube = KubeMode(kubernetes, reloads.reload, reloads.options, reloads.count_failure)
        reloads.file_reload = kube.reload
        supervisor.kubernetes = kubernetes.stats
    restart = restart or Restart(None)
    admin: AdminServer | None = None
    if config.admin.enabled:
        admin = AdminServer(
            config.admin, SupervisorBackend(supervisor), admin_reload(reloads.reload)
        )
    admin_sock = restart.take_admin()  # before start() closes what it did not take
    systemd = ServiceNotifier.from_environment()
    try:
        systemd.start(supervisor.stopping, lambda: restart.handed_off)
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

        async def sockets() -> dict[SocketKey, socket.socket]:
            handed = {key: sock.dup() for key, sock in supervisor.listening.handoff().items()}
            if admin is not None and admin.sock is not None:
                handed[ADMIN_KEY] = admin.sock.dup()
            handed.update(await udp_handoff.collect(supervisor.pool))  # the workers' own
            return handed

        retiring: set[asyncio.Task[None]] = set()  # the task below, referenced while it runs

        async def retire() -> None:
            try:  # each worker learns which of its UDP sockets to drain, then is stopped
                await udp_handoff.successor_serves(supervisor.pool, restart.successor_keys)
            finally:
                supervisor.stopping.set()

        if kube is not None:
            kube.when_synced(systemd.ready)  # ready once the API's state is applied
        else:
            systemd.ready()  # every worker serves: start() waited for each
        restart.serving(sockets, lambda: retiring.add(asyncio.create_task(retire())))
        following = asyncio.create_task(kubernetes.run()) if kubernetes is not None else None
        try:
            return await supervisor.run(watch=watch)
        finally:
            if following is not None:
                following.cancel()
                await asyncio.gather(following, return_exceptions=True)
    finally:
        systemd.close()
        restart.close()
        if admin is not None:
            await admin.stop(unlink=not restart.handed_off)
        await supervisor.addresses.release(keep=restart.handed_off)
        supervisor.close()
