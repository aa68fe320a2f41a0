"""Reload: read the file, validate all of it, diff, apply; or change nothing at all.

Requests (file watcher, SIGHUP, admin API) only record that a reload is wanted; one task does
the work, so bursts coalesce into one reload and two reloads never interleave.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import structlog

from lbd.config import ConfigError, load_text
from lbd.config.diff import ConfigDiff
from lbd.config.loader import LoadOptions
from lbd.config.yamlfile import read_config_file
from lbd.runtime.runtime import ListenerError, Runtime

log = structlog.get_logger("lbd.runtime.reload")

Outcome = Literal["applied", "unchanged", "failed"]


@dataclass(frozen=True, slots=True)
class ReloadResult:
    outcome: Outcome
    duration_s: float
    diff: ConfigDiff | None = None
    problems: tuple[str, ...] = ()


class ReloadRequests:
    """Reload requests from signals, watchers and the admin API, coalesced: ``request`` only
    records; ``serve`` runs one reload at a time, and requests made during one cause one more."""

    __slots__ = ("_reasons", "_wanted")

    def __init__(self) -> None:
        self._wanted = asyncio.Event()
        self._reasons: list[str] = []

    def request(self, reason: str) -> None:
        """Record that a reload is wanted (safe from a signal handler or a watcher)."""
        self._reasons.append(reason)
        self._wanted.set()

    async def serve(self, reload: Callable[[str], Awaitable[ReloadResult]]) -> None:
        """Call ``reload(reasons)`` for each burst of requests, until cancelled."""
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            reasons, self._reasons = self._reasons, []
            await reload(", ".join(sorted(set(reasons))))


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class Reloader:
    def __init__(
        self, runtime: Runtime, path: str, applied: bytes, options: LoadOptions | None = None
    ) -> None:
        self.runtime = runtime
        self.path = path
        self.options = options  # --node-name, --proxy-name: the same for every reload
        self._applied_hash = content_hash(applied)
        self._requests = ReloadRequests()
        self._lock = asyncio.Lock()

    def request(self, reason: str) -> None:
        """Record that a reload is wanted (safe from a signal handler or a watcher)."""
        self._requests.request(reason)

    async def run(self) -> None:
        """Serve requests until cancelled; requests made during a reload cause one more."""
        await self._requests.serve(self.reload)

    async def reload(self, reason: str, data: bytes | None = None) -> ReloadResult:
        """Reload from the file, or from ``data`` (a supervisor read and checked the file and
        hands every worker the same bytes)."""
        async with self._lock:
            return await self._reload(reason, data)

    async def _reload(self, reason: str, data: bytes | None) -> ReloadResult:
        started = time.perf_counter()
        process = self.runtime.process
        try:
            if data is None:
                data = read_config_file(self.path)
            digest = content_hash(data)
            if digest == self._applied_hash:
                process.reloads_unchanged += 1
                log.debug("config unchanged", reason=reason)
                return ReloadResult("unchanged", time.perf_counter() - started)
            config = load_text(data, self.path, self.options)
            if config.admin != self.runtime.config.admin:
                log.warning("the admin section changed; it takes effect on restart")
            diff = await self.runtime.apply(config)
        except ConfigError as error:
            return self._failed(reason, started, [str(p) for p in error.problems])
        except ListenerError as error:
            return self._failed(reason, started, [f"{self.path}: {error}"])
        self._applied_hash = digest
        process.reload_succeeded()
        duration = time.perf_counter() - started
        log.info(
            "config reloaded",
            reason=reason,
            duration_ms=round(duration * 1000, 1),
            **diff.summary(),
        )
        for line in diff.describe():
            log.info("config change", change=line)
        return ReloadResult("applied", duration, diff)

    def _failed(self, reason: str, started: float, problems: list[str]) -> ReloadResult:
        self.runtime.process.reload_failed()
        return reload_failed(reason, started, problems)


def reload_failed(reason: str, started: float, problems: list[str]) -> ReloadResult:
    """Log a reload that changed nothing (one error event, with the same ``path: message``
    lines as ``lbd check``) and say so; the caller counts it."""
    log.error(
        "config reload failed, keeping the running config",
        reason=reason,
        problems=problems,
        detail="\n".join(problems),
    )
    return ReloadResult("failed", time.perf_counter() - started, problems=tuple(problems))
