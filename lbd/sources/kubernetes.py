"""``lbd run --kubernetes``: list and watch Services, EndpointSlices and this node's Node, and
hand each settled state to the same validate → diff → apply path a config file takes.

Per resource, as client-go's reflector: list (paginated), then watch from the list's
resourceVersion with bookmarks; a watch the server ends is resumed from the last version seen;
410 Gone (an HTTP answer, or an ERROR event) means that version is too old: list again; any
other failure waits a jittered exponential backoff and resumes. Applies are bounded in
frequency (``BoundedRunner``: at most one per ``minSyncPeriod``, never later than that after
the last event), and none happens before every kind has been listed once.

While the API server is unreachable lbd keeps serving the last state it applied;
``KubernetesStats`` (``connected``, ``last_sync_time``) says how stale that is, and each change
of reachability is logged once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from lbd.config.loader import LoadOptions
from lbd.config.model import KubernetesSettings
from lbd.observability.stats import KubernetesStats
from lbd.sources.bounded import BoundedRunner
from lbd.sources.kube_client import (
    RESOURCES,
    SERVICE_ACCOUNT_DIR,
    TRANSPORT_ERRORS,
    ApiCalls,
    ApiError,
    Gone,
    Resource,
    open_client,
    status_error,
)
from lbd.sources.kube_state import KINDS, ClusterState, Obj, resource_version

log = structlog.get_logger("lbd.sources.kubernetes")

SOURCE_ERRORS = (ApiError, *TRANSPORT_ERRORS)
# A watch that ends sooner than this without an error still counts towards the backoff, so a
# server that closes every stream at once is not hammered.
SHORT_WATCH_S = 1.0
_EVENT_TYPES = ("ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR")  # WatchEvents' fields


class Applied(Protocol):
    """What the source needs to know of a reload (``lbd.runtime.reload.ReloadResult``)."""

    @property
    def outcome(self) -> str: ...

    @property
    def problems(self) -> tuple[str, ...]: ...


ApplyFn = Callable[[bytes], Awaitable[Applied]]


@dataclass(frozen=True, slots=True)
class KubernetesOptions:
    node_name: str  # whose Node object to watch (fieldSelector metadata.name)
    settings: KubernetesSettings = field(default_factory=KubernetesSettings)
    service_account_dir: str = SERVICE_ACCOUNT_DIR
    page_size: int = 500  # list `limit`
    backoff: tuple[float, float] = (0.8, 30.0)  # first delay and cap, as client-go's reflector
    watch_timeout_s: int = 300  # each watch asks for timeoutSeconds in [this, twice this)
    read_timeout_s: float = 60.0  # connect, and silence on a list (a watch: past its timeout)


class KubernetesSource:
    def __init__(
        self,
        options: KubernetesOptions,
        base: Obj,
        load_options: LoadOptions,
        base_path: str | None = None,
    ) -> None:
        self.options = options
        self.base_path = base_path  # the file ``base`` came from (read again on SIGHUP)
        self.stats = KubernetesStats()
        self.state = ClusterState(
            base, load_options, options.settings.allowed_service_ips, self.stats
        )
        self.apply: ApplyFn | None = None  # set by whoever runs it (a runtime or a supervisor)
        self.on_synced: Callable[[], None] | None = None  # once, after the first apply
        self.runner = BoundedRunner(self.sync, options.settings.min_sync_period)
        self._client: Any = None
        self._calls: ApiCalls | None = None
        self._reached: set[str] = set()  # kinds with a successful request since start
        self._failing: dict[str, str] = {}  # kind -> its last error, while failing
        self._lock = asyncio.Lock()
        self._rng = random.Random()

    async def open(self) -> None:
        """Load the client configuration; raises ``SourceError`` (nothing to retry)."""
        self._client = await open_client(
            self.options.settings.kubeconfig, self.options.service_account_dir
        )
        self._calls = ApiCalls(
            self._client,
            self.options.node_name,
            self.options.page_size,
            self.options.read_timeout_s,
        )

    async def run(self) -> None:
        """Follow every resource and apply until cancelled (after ``open``)."""
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.runner.run())
                for resource in RESOURCES:
                    group.create_task(self._follow(resource))
        finally:
            if self._client is not None:
                await self._client.close()

    # -- list and watch ------------------------------------------------------------------------

    async def _follow(self, resource: Resource) -> None:
        assert self._calls is not None
        loop = asyncio.get_running_loop()
        version: str | None = None
        lists = failures = 0
        while True:
            try:
                if version is None:
                    items, version = await self._calls.list(resource)
                    if lists:
                        self.stats.kind(resource.kind).kubernetes_relists_total += 1
                    lists += 1
                    self._reached_ok(resource)
                    self.state.replace(resource.kind, items)
                    self._changed()
                started = loop.time()
                version = await self._watch(resource, version)
                failures = failures + 1 if loop.time() - started < SHORT_WATCH_S else 0
            except Gone as error:
                log.info(
                    "kubernetes watch expired, listing again", kind=resource.kind, why=str(error)
                )
                version = None
                failures += 1
            except SOURCE_ERRORS as error:
                self._failed(resource, error)
                failures += 1
            except Exception as error:  # a bug must not stop the watch for good: log, count
                log.exception("kubernetes watch failed", kind=resource.kind)
                self._failed(resource, error)
                failures += 1
            if failures:
                await asyncio.sleep(self._backoff(failures))

    async def _watch(self, resource: Resource, version: str) -> str:
        """Apply events until the server ends the stream; returns the last version seen."""
        assert self._calls is not None
        low = self.options.watch_timeout_s
        events = await self._calls.watch(resource, version, self._rng.randrange(low, 2 * low))
        self._reached_ok(resource)
        async for event in events:
            kind_type = str(event.get("type"))
            obj = event.get("object")
            seen = self.stats.kind(resource.kind).kubernetes_watch_events_total
            if kind_type in _EVENT_TYPES:
                setattr(seen, kind_type, getattr(seen, kind_type) + 1)
            if kind_type == "ERROR":
                raise status_error(obj)
            if not isinstance(obj, dict):
                continue
            version = resource_version(obj) or version
            if kind_type in ("ADDED", "MODIFIED", "DELETED") and self.state.event(
                resource.kind, kind_type, obj
            ):
                self._changed()
        return version

    def _changed(self) -> None:
        # Before every kind is listed nothing applies; a run then would only delay the first.
        if self.state.complete:
            self.runner.request()

    def _backoff(self, failures: int) -> float:
        first, cap = self.options.backoff
        delay = min(cap, first * 2.0 ** min(failures - 1, 30))
        return delay * (1 + self._rng.random())  # jitter 1.0, as client-go's wait.Backoff

    def _reached_ok(self, resource: Resource) -> None:
        self._reached.add(resource.kind)
        recovered = self._failing.pop(resource.kind, None) is not None and not self._failing
        if recovered:
            log.info("kubernetes API reachable again", stale_s=self.stale_s())
        connected = not self._failing and self._reached.issuperset(KINDS)
        self.stats.kubernetes_connected = 1 if connected else 0

    def _failed(self, resource: Resource, error: BaseException) -> None:
        self.stats.kind(resource.kind).kubernetes_errors_total += 1
        text = f"{type(error).__name__}: {error}"[:300]
        if not self._failing:
            log.warning(
                "kubernetes API unreachable, serving the last state",
                kind=resource.kind,
                error=text,
                stale_s=self.stale_s(),
            )
        self._failing[resource.kind] = text
        self.stats.kubernetes_connected = 0

    def stale_s(self) -> float | None:
        """Seconds since the API's state was last applied (None before the first time)."""
        last = self.stats.last_sync_time
        return round(time.time() - last, 1) if last else None

    # -- apply ---------------------------------------------------------------------------------

    async def sync(self) -> Applied | None:
        """Apply the current state (None: not every kind listed yet, or nothing to apply to)."""
        async with self._lock:
            if not self.state.complete or self.apply is None:
                return None
            try:
                result = await self._apply_until_settled(self.apply)
            except Exception:  # the source must outlive any bug in a reload: log, count
                log.exception("kubernetes sync failed")
                self.stats.kubernetes_syncs_total.failed += 1
                return None
            self._record(result)
            return result

    async def _apply_until_settled(self, apply: ApplyFn) -> Applied:
        for _ in range(3):  # a conflict is reverted, and a second one dropped
            data, keys = self.state.document()
            result = await apply(data)
            if result.outcome != "failed":
                return result
            if not self.state.reject_conflicts(result.problems, keys):
                return result
        return result

    def _record(self, result: Applied) -> None:
        syncs = self.stats.kubernetes_syncs_total
        if result.outcome in ("applied", "unchanged", "failed"):
            setattr(syncs, result.outcome, getattr(syncs, result.outcome) + 1)
        if result.outcome == "failed":
            return
        self.stats.kubernetes_last_sync_timestamp_seconds = time.time()
        if not self.stats.synced:
            self.stats.synced = True
            log.info("kubernetes state applied; ready", services=len(self.state.services))
            if self.on_synced is not None:
                self.on_synced()
        for seconds in self.state.applied():
            self.stats.network_programming_duration_seconds.observe(seconds)

    async def reload_base(self, base: Obj) -> Applied | None:
        """The file changed (SIGHUP, the watcher, the admin API): apply with its new settings."""
        self.state.set_base(base)
        return await self.sync()
