"""What the admin API reads and changes: one process's runtime, or (with several workers) the
supervisor's view of them all (``lbd.process.supervisor``). The HTTP layer sees only this
interface."""

from __future__ import annotations

from typing import Protocol

from lbd.admin import views
from lbd.admin.health import Health
from lbd.config.model import Config
from lbd.observability.snapshot import Snapshot
from lbd.runtime.runtime import Runtime


class AdminBackend(Protocol):
    @property
    def ready(self) -> bool: ...

    @property
    def config(self) -> Config: ...

    async def snapshot(self) -> Snapshot:
        """Every metric, summed over workers where there are several."""
        ...

    async def view(self, name: str, query: dict[str, str]) -> views.Json:
        """``views.call``; raises ``views.NotFound``/``views.BadRequest``."""
        ...

    def health(self) -> Health:
        """What ``GET /healthz`` answers from."""
        ...


class LocalBackend:
    __slots__ = ("runtime",)

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @property
    def ready(self) -> bool:
        """Serving; with ``--kubernetes``, also after the API's first full state is applied."""
        source = self.runtime.kubernetes
        return self.runtime.ready and (source is None or source.synced)

    @property
    def config(self) -> Config:
        return self.runtime.config

    async def snapshot(self) -> Snapshot:
        return self.runtime.metrics_snapshot()

    async def view(self, name: str, query: dict[str, str]) -> views.Json:
        return views.call(self.runtime, name, query)

    def health(self) -> Health:
        runtime = self.runtime
        applied = runtime.process.config_last_reload_success_timestamp_seconds
        return Health(runtime.ready, applied, runtime.reloads, runtime.kubernetes)
