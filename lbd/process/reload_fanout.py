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
from lbd.config.diff import diff_configs
from lbd.config.loader import LoadOptions
from lbd.config.model import Config
from lbd.config.yamlfile import read_config_file
from lbd.process.listening import ListeningSockets, Sockets
from lbd.process.messages import Reload, ReloadDone, Reply, SlotTable
from lbd.process.workers import WorkerSet, WorkerSlot
from lbd.runtime.reload import ReloadRequests, ReloadResult, content_hash, reload_failed
from lbd.runtime.runtime import ListenerError
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
    ) -> None:
        self.config = config  # what every worker runs
        self.path, self.data = source
        self.options = options  # --node-name, --proxy-name: the same for every reload
        self.listening = listening
        self.workers = workers
        self.counts = counts
        self.slots = slots
        self.slots_table: SlotTable = slots.assign(config)
        self.reloads_ok = 0
        self.reloads_failed = 0
        self._lock = asyncio.Lock()
        self._requests = ReloadRequests()
        # lbd run --kubernetes: a reload without data reads the file's settings (KubeMode)
        self.file_reload: Callable[[str], Awaitable[ReloadResult]] | None = None

    def request(self, reason: str) -> None:
        self._requests.request(reason)

    async def run(self) -> None:
        await self._requests.serve(self.reload)

    async def reload(self, reason: str, data: bytes | None = None) -> ReloadResult:
        """Reload from the file, or apply ``data`` (the Kubernetes source's document)."""
        if data is None and self.file_reload is not None:
            return await self.file_reload(reason)
        async with self._lock:
            return await self._reload(reason, data)

    async def _reload(self, reason: str, data: bytes | None) -> ReloadResult:
        started = time.perf_counter()
        try:
            data = read_config_file(self.path) if data is None else data
            if content_hash(data) == content_hash(self.data):
                return ReloadResult("unchanged", time.perf_counter() - started)
            config = load_text(data, self.path, self.options)
            diff = diff_configs(self.config, config)
            added = self.listening.bind(diff.listeners_added)
        except ConfigError as error:
            return self._failed(reason, started, [str(p) for p in error.problems])
        except ListenerError as error:
            return self._failed(reason, started, [f"{self.path}: {error}"])
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
        self.reloads_ok += 1
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

    async def _ask(self, member: WorkerSlot, reason: str, data: bytes, added: Sockets) -> Reply:
        keys, socks = self.listening.for_worker(member.index, added)
        request = Reload(reason=reason, data=data, keys=keys, slots=self.slots_table)
        return await self.workers.ask(member, request, REPLY_TIMEOUT_S, socks)

    def _failed(self, reason: str, started: float, problems: list[str]) -> ReloadResult:
        self.reloads_failed += 1
        return reload_failed(reason, started, problems)
