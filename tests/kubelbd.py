"""An in-process lbd whose services come from a fake API server (tests/kubeapi.py), wired as
``lbd run --kubernetes`` wires one process: Runtime + Reloader + KubeMode + admin API, with the
real kubernetes_asyncio client talking HTTP to the fake."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from lbd.admin.client import AdminTarget
from lbd.admin.server import AdminServer
from lbd.config.loader import LoadOptions
from lbd.observability.stats import KubernetesStats
from lbd.process.kube_mode import KubeMode, kubernetes_source
from lbd.process.worker import admin_reload
from lbd.runtime.reload import Reloader
from lbd.runtime.runtime import Runtime
from lbd.sources.kubernetes import KubernetesSource
from tests import kubeobjects as k
from tests.kubeapi import FakeApiServer, fake_api_server, kubeconfig
from tests.support import (
    BackendStats,
    NamedEcho,
    close_transports,
    echo_backend,
    fresh_ip,
    read_name,
    settle,
    tcp_server,
)

NODE = "node-a"
HTTP = [{"name": "http", "port": 0, "targetPort": "http"}]


@dataclasses.dataclass
class KubeLbd:
    runtime: Runtime
    source: KubernetesSource
    mode: KubeMode
    admin: AdminTarget
    config_path: Path

    @property
    def stats(self) -> KubernetesStats:
        return self.source.stats

    def address(self, service: str, index: int = 0, kind: str = "clusterIP") -> tuple[str, int]:
        return self.runtime.listener_for(service, index, kind).bound

    def has(self, service: str) -> bool:
        return any(s.key == service for s in self.runtime.config.services)


@contextlib.asynccontextmanager
async def kube_lbd(
    server: FakeApiServer,
    tmp_path: Path,
    base: str = "",
    *,
    min_sync_period: str = "50ms",
    allowed_service_ips: str | None = None,
    in_cluster: bool = False,
    **options: Any,
) -> AsyncIterator[KubeLbd]:
    """``base`` adds lines to the ``source: kubernetes`` file; ``options`` replace fields of
    ``KubernetesOptions`` (backoff, page_size, ...; test-sized defaults). ``in_cluster``: no
    kubeconfig (the caller sets KUBERNETES_SERVICE_HOST and ``service_account_dir``)."""
    config_file = tmp_path / "kubeconfig.json"
    config_file.write_text(kubeconfig(server))
    kubeconfig_path = None if in_cluster else str(config_file)
    path = tmp_path / "lbd.yaml"
    path.write_text(
        f"apiVersion: lbd/v1\nsource: kubernetes\nadmin: {{address: '{fresh_ip()}:0'}}\n{base}"
    )
    load = LoadOptions(NODE)
    config, initial, source = kubernetes_source(
        path.read_bytes(), str(path), load, kubeconfig_path, min_sync_period, allowed_service_ips
    )
    source.options = dataclasses.replace(
        source.options, **{"backoff": (0.05, 0.5), "read_timeout_s": 5.0, **options}
    )
    runtime = Runtime(config)
    await runtime.start()
    reloader = Reloader(runtime, str(path), initial, load)
    mode = KubeMode(source, reloader.reload, load, runtime.process.reload_failed)
    runtime.kubernetes = source.stats
    admin = AdminServer(config.admin, runtime, admin_reload(mode.reload))
    await admin.start()
    await source.open()
    task = asyncio.create_task(mode.run())
    try:
        yield KubeLbd(runtime, source, mode, AdminTarget(address=admin.bound), path)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await admin.stop()
        runtime.stop_accepting()
        runtime.close_all("test_teardown")
        await runtime.health.wait_closed()
        await settle()


async def answers(lbd: KubeLbd, service: str, names: set[str], timeout: float = 5.0) -> None:
    """Wait until connections to ``service`` (its first clusterIP listener) are answered by
    exactly ``names`` (several connections, as the balancer rotates)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen: set[str] = set()
    while loop.time() < deadline:
        try:
            host, port = lbd.address(service)
            seen = {await read_name(host, port, 1.0) for _ in range(2 * len(names) + 2)}
        except (KeyError, OSError, TimeoutError):
            seen = set()
        if seen == names:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{service} answered by {seen}, wanted {names}")


def web(name: str, host: str, port: int, cluster_ip: str | None = None, **kw: Any) -> list[k.Obj]:
    """A Service ``name`` (port 0: the kernel picks) and one EndpointSlice with one endpoint."""
    return [
        k.service(name, cluster_ip or fresh_ip(), HTTP, **kw),
        k.endpoint_slice(f"{name}-x1", name, [host], [{"name": "http", "port": port}]),
    ]


@dataclasses.dataclass
class WebCluster:
    """Service ``web`` (slice ``web-x1``) served by backend "a"; backend "b" idle."""

    api: FakeApiServer
    lbd: KubeLbd
    service: k.Obj
    slice: k.Obj
    a: tuple[str, int]
    b: tuple[str, int]

    def move_to_b(self) -> None:
        """Update the slice: its endpoint is now backend "b"."""
        self.slice["endpoints"][0]["addresses"] = [self.b[0]]
        self.slice["ports"][0]["port"] = self.b[1]
        self.api.put(self.slice)


@contextlib.asynccontextmanager
async def web_cluster(tmp_path: Path, **options: Any) -> AsyncIterator[WebCluster]:
    """A fake cluster with ``web`` on backend "a" and lbd serving it (``options``: kube_lbd's)."""
    async with (
        echo_backend("a") as (ha, pa, _),
        echo_backend("b") as (hb, pb, _),
        fake_api_server() as api,
    ):
        service, endpoints = web("web", ha, pa)
        api.put(service, endpoints, k.node(NODE, [fresh_ip()]))
        async with kube_lbd(api, tmp_path, **options) as lbd:
            await answers(lbd, "default/web", {"a"})
            yield WebCluster(api, lbd, service, endpoints, (ha, pa), (hb, pb))


async def refused(address: tuple[str, int]) -> bool:
    try:
        await read_name(*address, 1.0)
    except OSError:
        return True
    return False


@contextlib.asynccontextmanager
async def same_port_backends(count: int) -> AsyncIterator[tuple[list[str], int]]:
    """``count`` named echo backends ("backend-i") on fresh 127.x addresses and one port number,
    as the pods of one EndpointSlice share its port."""
    stats = BackendStats()
    hosts: list[str] = []
    port = 0
    try:
        async with contextlib.AsyncExitStack() as stack:
            for index in range(count):

                def factory(name: str = f"backend-{index}") -> NamedEcho:
                    return NamedEcho(name, stats)

                host, port, _ = await stack.enter_async_context(tcp_server(factory, port=port))
                hosts.append(host)
            yield hosts, port
    finally:
        await close_transports(stats.transports)


def relists(stats: KubernetesStats, kind: str | None = None) -> int:
    return sum(s.kubernetes_relists_total for k, s in stats.kinds.items() if kind in (None, k))


def errors(stats: KubernetesStats) -> int:
    return sum(s.kubernetes_errors_total for s in stats.kinds.values())


def events(stats: KubernetesStats, kind: str, kind_type: str) -> int:
    found = stats.kinds.get(kind)
    return getattr(found.kubernetes_watch_events_total, kind_type) if found else 0


def syncs(stats: KubernetesStats) -> int:
    done = stats.kubernetes_syncs_total
    return done.applied + done.unchanged + done.failed
