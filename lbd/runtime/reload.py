"""Reload: read the file, validate all of it, diff, apply; or change nothing at all.

Requests (file watcher, SIGHUP, admin API) only record that a reload is wanted; one task does
the work, so bursts coalesce into one reload and two reloads never interleave, and that task
survives anything a reload raises (logged and counted as a failure). Reading, parsing,
validating and diffing run in a worker thread under a deadline (``lbd.runtime.plan``): the event
loop only applies the result. Bytes that failed are remembered, so an unchanged bad file is not
validated (nor its problems logged) again on every burst of file events.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable

import structlog

from lbd.config import ConfigError, load_text
from lbd.config.diff import ConfigDiff
from lbd.config.loader import LoadOptions
from lbd.config.release import release
from lbd.config.yamlfile import read_config_file
from lbd.runtime.plan import Plan, collector_paused
from lbd.runtime.runtime import ListenerError, Runtime
from lbd.runtime.status import ReloadResult

log = structlog.get_logger("lbd.runtime.reload")


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

    async def serve(
        self,
        reload: Callable[[str], Awaitable[ReloadResult]],
        crashed: Callable[[], None] = lambda: None,
    ) -> None:
        """Call ``reload(reasons)`` for each burst of requests, until cancelled. A reload that
        raises is logged and reported to ``crashed`` (to count it); the next one still runs."""
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            reasons, self._reasons = self._reasons, []
            reason = ", ".join(sorted(set(reasons)))
            try:
                await reload(reason)
            except Exception:
                log.exception("config reload crashed, keeping the running config", reason=reason)
                crashed()


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


PLAN_TIMEOUT_S = 120.0  # read + parse + validate + diff: 10,000 services take a few seconds
MAX_LOGGED_PROBLEMS = 50


class Reloader:
    def __init__(
        self, runtime: Runtime, path: str, applied: bytes, options: LoadOptions | None = None
    ) -> None:
        self.runtime = runtime
        self.path = path
        self.options = options  # --node-name, --proxy-name: the same for every reload
        self._applied_hash = content_hash(applied)
        self._failed: tuple[str, tuple[str, ...]] = ("", ())  # bytes that failed, and why
        self._requests = ReloadRequests()
        self._lock = asyncio.Lock()

    def request(self, reason: str) -> None:
        """Record that a reload is wanted (safe from a signal handler or a watcher)."""
        self._requests.request(reason)

    async def run(self) -> None:
        """Serve requests until cancelled; requests made during a reload cause one more."""
        await self._requests.serve(self.reload, self.runtime.process.reload_failed)

    async def reload(self, reason: str, data: bytes | None = None) -> ReloadResult:
        """Reload from the file, or from ``data`` (a supervisor read and checked the file and
        hands every worker the same bytes)."""
        async with self._lock:
            status = self.runtime.reloads
            status.begin()
            result = ReloadResult("failed", 0.0, problems=("the reload crashed",))
            try:
                result = await self._reload(reason, data)
            finally:
                status.end(result)
            return result

    async def _reload(self, reason: str, data: bytes | None) -> ReloadResult:
        started = time.perf_counter()
        process = self.runtime.process
        digest = ""
        try:
            if data is None:
                data = await asyncio.to_thread(read_config_file, self.path)
            digest = content_hash(data)
            if digest == self._applied_hash:
                process.reloads_unchanged += 1
                log.debug("config unchanged", reason=reason)
                return ReloadResult("unchanged", time.perf_counter() - started)
            if digest == self._failed[0]:
                process.reloads_unchanged += 1
                log.debug("config unchanged since it failed", reason=reason)
                duration = time.perf_counter() - started
                return ReloadResult("failed", duration, problems=self._failed[1])
            plan = await asyncio.wait_for(asyncio.to_thread(self._plan, data), PLAN_TIMEOUT_S)
            if plan.config.admin != self.runtime.config.admin:
                log.warning("the admin section changed; it takes effect on restart")
            replaced = [plan.base, self.runtime.specs]  # garbage once the plan applies
            diff = await self.runtime.apply(plan)
            del plan
            await asyncio.to_thread(release, replaced)  # in pieces, off the loop
        except ConfigError as error:
            problems = [str(p) for p in error.problems]
            return self._failed_with(reason, started, problems, remember=digest)
        except ListenerError as error:  # the bytes may work once the port is free: not kept
            return self._failed_with(reason, started, [f"{self.path}: {error}"])
        except TimeoutError:
            problems = [f"{self.path}: not validated within {PLAN_TIMEOUT_S:.0f} s"]
            return self._failed_with(reason, started, problems)
        self._applied_hash = digest
        self._failed = ("", ())
        process.reload_succeeded()
        duration = time.perf_counter() - started
        log.info(
            "config reloaded",
            reason=reason,
            duration_ms=round(duration * 1000, 1),
            **diff.summary(),
        )
        log_changes(diff)
        return ReloadResult("applied", duration, diff)

    def _plan(self, data: bytes) -> Plan:
        """In a worker thread: parse, validate and diff (nothing here touches live state)."""
        with collector_paused():
            return self.runtime.plan(load_text(data, self.path, self.options))

    def _failed_with(
        self, reason: str, started: float, problems: list[str], remember: str = ""
    ) -> ReloadResult:
        """Count and log a failed reload; ``remember``: the hash of bytes that will fail the
        same way every time (invalid), so they are not validated again."""
        self.runtime.process.reload_failed()
        if remember:
            self._failed = (remember, tuple(problems))
        return reload_failed(reason, started, problems)


MAX_LOGGED_CHANGES = 100


def log_changes(diff: ConfigDiff) -> None:
    """One line per change, up to MAX_LOGGED_CHANGES (a reload of thousands of services must
    not spend the event loop on log lines); the summary line has the counts."""
    lines = diff.describe()
    for line in lines[:MAX_LOGGED_CHANGES]:
        log.info("config change", change=line)
    if len(lines) > MAX_LOGGED_CHANGES:
        log.info("config change", change=f"... and {len(lines) - MAX_LOGGED_CHANGES} more")


def reload_failed(reason: str, started: float, problems: list[str]) -> ReloadResult:
    """Log a reload that changed nothing (one error event, with the same ``path: message``
    lines as ``lbd check``) and say so; the caller counts it."""
    shown = problems[:MAX_LOGGED_PROBLEMS]
    if len(problems) > len(shown):
        shown.append(f"... and {len(problems) - len(shown)} more problems")
    log.error(
        "config reload failed, keeping the running config",
        reason=reason,
        problems=shown,
        detail="\n".join(shown),
    )
    return ReloadResult("failed", time.perf_counter() - started, problems=tuple(problems))
