"""The supervisor's reload: read and check the file once, bind the new listeners once, send
every worker the same bytes and slot table, and keep the new config only when a worker applied
it (else nothing changed anywhere, and the sockets bound for it are closed).

``ReloadFanOut`` owns what the workers must agree on: the config that runs (its path and
bytes), and the slot table of the shared counts (``lbd.shm.counts``). Requests (file watcher,
SIGHUP, admin API) only record; one task reloads, so bursts coalesce and reloads never overlap.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from lbd.config import ConfigError, load_text
from lbd.config.diff import ConfigDiff, diff_configs
from lbd.config.loader import LoadOptions
from lbd.config.model import Config
from lbd.config.yamlfile import read_config_file
from lbd.net.addresses import NodeAddresses
from lbd.net.netlink import NetlinkFailure
from lbd.observability.stats import Results
from lbd.process.listening import ListeningSockets, Sockets
from lbd.process.messages import Reload, ReloadDone, Reply, SlotTable
from lbd.process.workers import WorkerSet, WorkerSlot
from lbd.runtime.plan import collector_paused
from lbd.runtime.reload import (
    PLAN_TIMEOUT_S,
    ReloadRequests,
    content_hash,
    reload_failed,
)
from lbd.runtime.runtime import ListenerError
from lbd.runtime.status import ReloadResult, ReloadStatus
from lbd.shm.counts import SharedCounts, SlotAllocator

log = structlog.get_logger("lbd.process.supervisor")

REPLY_TIMEOUT_S = 30.0  # a reload in every worker


class ReloadFanOut:
    def __init__(
        self,
        config: Config,
        source: tuple[str, bytes],
        options: LoadOptions,
        listening: ListeningSockets,
        workers: WorkerSet,
        counts: SharedCounts,
        slots: SlotAllocator,
        addresses: NodeAddresses | None = None,
    ) -> None:
        self.config = config  # what every worker runs
        self.path, self.data = source
        self.options = options  # --node-name, --proxy-name: the same for every reload
        self.listening = listening
        self.workers = workers
        self.counts = counts
        self.slots = slots
        self.addresses = addresses or NodeAddresses()  # the node's service addresses
        self.slots_table: SlotTable = slots.assign(config)
        self.results = Results()  # lbd_config_reloads_total: the supervisor decides them
        self._failed_bytes: tuple[str, tuple[str, ...]] = ("", ())  # invalid bytes, and why
        self.status = ReloadStatus()  # the last reload's outcome, for /healthz
        self.applied_at = time.time()  # wall clock: the running config's apply
        self._lock = asyncio.Lock()
        self._requests = ReloadRequests()
        # lbd run --kubernetes: a reload without data reads the file's settings (KubeMode)
        self.file_reload: Callable[[str], Awaitable[ReloadResult]] | None = None

    def request(self, reason: str) -> None:
        self._requests.request(reason)

    async def run(self) -> None:
        await self._requests.serve(self.reload, self.count_failure)

    def count_failure(self) -> None:
        """A reload that failed outside ``reload`` (it raised, or a source gave up)."""
        self.results.failure += 1

    async def reload(self, reason: str, data: bytes | None = None) -> ReloadResult:
        """Reload from the file, or apply ``data`` (the Kubernetes source's document)."""
        if data is None and self.file_reload is not None:
            return await self.file_reload(reason)
        async with self._lock:
            self.status.begin()
            result = ReloadResult("failed", 0.0, problems=("the reload crashed",))
            try:
                result = await self._reload(reason, data)
            finally:
                self.status.end(result)
            return result

    async def _reload(self, reason: str, data: bytes | None) -> ReloadResult:
        started = time.perf_counter()
        digest = ""
        try:
            if data is None:
                data = await asyncio.to_thread(read_config_file, self.path)
            digest = content_hash(data)
            if digest == content_hash(self.data):
                return ReloadResult("unchanged", time.perf_counter() - started)
            if digest == self._failed_bytes[0]:  # not validated (nor logged) again
                duration = time.perf_counter() - started
                return ReloadResult("failed", duration, problems=self._failed_bytes[1])
            config, diff = await asyncio.wait_for(
                asyncio.to_thread(self._check, data), PLAN_TIMEOUT_S
            )
            await self.addresses.prepare(config)  # before the listeners that need them
            added = self.listening.bind(diff.listeners_added)
        except ConfigError as error:
            problems = [str(p) for p in error.problems]
            self._failed_bytes = (digest, tuple(problems))
            return self._failed(reason, started, problems)
        except ListenerError as error:
            return self._failed(reason, started, [f"{self.path}: {error}"])
        except TimeoutError:
            problems = [f"{self.path}: not validated within {PLAN_TIMEOUT_S:.0f} s"]
            return self._failed(reason, started, problems)
        except NetlinkFailure as error:
            return self._failed(reason, started, [f"{self.path}: node.manageAddresses: {error}"])
        self.slots_table = self.slots.assign(config, self.counts)
        serving = self.workers.serving()
        replies = await asyncio.gather(
            *(self._ask(member, reason, data, added) for member in serving),
            return_exceptions=True,
        )
        done = [r for r in replies if isinstance(r, ReloadDone)]
        problems = sorted(
            {problem for reply in done for problem in reply.problems}
            | {f"a worker did not answer: {r}" for r in replies if isinstance(r, BaseException)}
        )
        if not any(reply.outcome == "applied" for reply in done) and problems:
            self.listening.discard(added)
            return self._failed(reason, started, problems)
        self.listening.commit(added, diff.listeners_removed)
        self.config = config
        self.data = data
        self.workers.forget_faults({spec.key for spec in diff.routes_removed})
        self.addresses.commit(config)
        self.results.success += 1
        self.applied_at = time.time()
        duration = time.perf_counter() - started
        log.info(
            "config reloaded",
            reason=reason,
            workers=len(replies),
            duration_ms=round(duration * 1000, 1),
            **diff.summary(),
        )
        if problems:  # some workers applied it and some did not: say so, loudly
            log.error("config reload failed in some workers", problems=problems)
        return ReloadResult("applied", duration, diff, tuple(problems))

    def _check(self, data: bytes) -> tuple[Config, ConfigDiff]:
        """In a worker thread: parse, validate and diff the new bytes."""
        with collector_paused():
            config = load_text(data, self.path, self.options)
            return config, diff_configs(self.config, config)

    async def _ask(self, member: WorkerSlot, reason: str, data: bytes, added: Sockets) -> Reply:
        keys, socks = self.listening.for_worker(member.index, added)
        request = Reload(reason=reason, data=data, keys=keys, slots=self.slots_table)
        return await self.workers.ask(member, request, REPLY_TIMEOUT_S, socks)

    def _failed(self, reason: str, started: float, problems: list[str]) -> ReloadResult:
        self.results.failure += 1
        return reload_failed(reason, started, problems)
