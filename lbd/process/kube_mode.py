"""``lbd run --kubernetes``, in one process or under a supervisor.

The Kubernetes source (``lbd.sources.kubernetes``) hands its documents to the same reload a
file change takes: ``Reloader.reload(reason, data)`` in one process, the supervisor's fan-out
(every worker gets the same bytes) with ``workers: N``. SIGHUP, the file watcher and
``POST /reload`` then mean "read the file's settings again" (node, defaults, admin...): the
services keep coming from the API server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from lbd.config.errors import ConfigError, FieldError, Problem
from lbd.config.kubesource import allowed_cidrs
from lbd.config.kubesource import min_sync_period as parse_min_sync_period
from lbd.config.loader import LoadOptions
from lbd.config.model import Config
from lbd.config.yamlfile import read_config_file
from lbd.runtime.reload import ReloadRequests, reload_failed
from lbd.runtime.status import ReloadResult
from lbd.sources.kube_client import SourceError
from lbd.sources.kube_state import read_base
from lbd.sources.kubernetes import KubernetesOptions, KubernetesSource

__all__ = ["KubeMode", "SourceError", "kubernetes_mode", "kubernetes_source"]

ApplyData = Callable[[str, bytes], Awaitable[ReloadResult]]
NO_FILE = b'{"apiVersion": "lbd/v1"}'  # lbd run --kubernetes without a file: every default


def kubernetes_source(
    data: bytes | None,
    path: str | None,
    options: LoadOptions | None,
    kubeconfig: str | None = None,
    min_sync_period: str | None = None,
    allowed_service_ips: str | None = None,
) -> tuple[Config, bytes, KubernetesSource]:
    """The config to start with (the file's, without services), the bytes it loads from, and
    the source. Flags (given as text) replace the file's ``kubernetes:`` settings. A
    ConfigError when the file or a flag is not valid."""
    options = options or LoadOptions()
    config, base = read_base(data or NO_FILE, path or "<kubernetes>", options)
    overrides: dict[str, Any] = {"kubeconfig": kubeconfig} if kubeconfig else {}
    flag = "--min-sync-period"
    try:
        if min_sync_period is not None:
            overrides["min_sync_period"] = parse_min_sync_period(min_sync_period)
        flag = "--allowed-service-ips"
        if allowed_service_ips is not None:
            overrides["allowed_service_ips"] = allowed_cidrs(allowed_service_ips)
    except FieldError as error:
        raise ConfigError([Problem(flag, str(error))]) from None
    settings = dataclasses.replace(config.kubernetes, **overrides)
    source = KubernetesSource(KubernetesOptions(config.node.name, settings), base, options, path)
    initial = json.dumps({**base, "apiVersion": "lbd/v1"}).encode()
    return config, initial, source


def kubernetes_mode(
    args: Any, config: Config | None, data: bytes | None, options: LoadOptions | None
) -> tuple[Config, bytes, KubernetesSource | None]:
    """``lbd run``: with ``--kubernetes`` or a ``source: kubernetes`` file, the config to start
    with, its bytes and the source; else ``config`` and ``data`` as they are (a file)."""
    if not (args.kubernetes or (config is not None and config.source == "kubernetes")):
        assert config is not None and data is not None
        return config, data, None
    flags = (args.kubeconfig, args.min_sync_period, args.allowed_service_ips)
    return kubernetes_source(data, args.config, options, *flags)


class KubeMode:
    """Reload requests of a Kubernetes-sourced lbd; ``run`` also runs the source."""

    def __init__(
        self,
        source: KubernetesSource,
        apply: ApplyData,
        options: LoadOptions,
        count_failure: Callable[[], None],
    ) -> None:
        self.source = source
        self.options = options
        self._apply = apply
        self._count_failure = count_failure
        self._requests = ReloadRequests()
        source.apply = self.apply

    def when_synced(self, ready: Callable[[], None]) -> None:
        """Call ``ready`` once the API's first full state is applied (systemd's READY=1)."""
        if self.source.stats.synced:
            ready()
        else:
            self.source.on_synced = ready

    async def apply(self, data: bytes) -> ReloadResult:
        return await self._apply("kubernetes", data)

    def request(self, reason: str) -> None:
        """Record that the file's settings should be read again (signal handler, watcher)."""
        self._requests.request(reason)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.source.run())
            group.create_task(self._requests.serve(self.reload))

    async def reload(self, reason: str) -> ReloadResult:
        """Read the file again and apply the API's state with its settings."""
        started = time.perf_counter()
        path = self.source.base_path
        if path is None:
            return ReloadResult("unchanged", 0.0)
        try:
            _, base = read_base(read_config_file(path), path, self.options)
        except ConfigError as error:
            self._count_failure()
            return reload_failed(reason, started, [str(p) for p in error.problems])
        result = await self.source.reload_base(base)
        if isinstance(result, ReloadResult):
            return result
        # Not synced yet: the settings apply with the first state.
        return ReloadResult("unchanged", time.perf_counter() - started)
