"""The supervisor's reload: read and check the file once, bind the new listeners once, send
every worker the same bytes and slot table, and keep the new config only when a worker applied
it (else nothing changed anywhere, and the sockets bound for it are closed).

``ReloadFanOut`` is the reload half of ``lbd.process.supervisor.Supervisor``, kept here so that
each file
reads in one sitting; its state lives in the Supervisor.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog

from lbd.config import ConfigError, load_text
from lbd.config.diff import diff_configs
from lbd.config.loader import LoadOptions
from lbd.config.model import Config, ListenerSpec
from lbd.config.yamlfile import read_config_file
from lbd.process.channel import Message
from lbd.runtime.reload import ReloadRequests, ReloadResult, content_hash, reload_failed
from lbd.runtime.runtime import ListenerError
from lbd.shm.counts import SharedCounts, SlotAllocator, SlotKey

if TYPE_CHECKING:
    from lbd.process.supervisor import WorkerSlot

log = structlog.get_logger("lbd.process.supervisor")

REPLY_TIMEOUT_S = 30.0  # a reload in every worker
Sockets = dict[tuple[object, ...], list[socket.socket]]


class ReloadFanOut:
    """Mixin: the Supervisor's reload (see the module docstring)."""

    # The Supervisor's state that a reload reads and updates.
    path: str
    data: bytes
    config: Config
    options: LoadOptions
    members: list[WorkerSlot]
    sockets: Sockets
    counts: SharedCounts
    slots: SlotAllocator
    slots_table: dict[SlotKey, int]
    reloads_ok: int
    reloads_failed: int
    _reload_lock: asyncio.Lock
    _reload_requests: ReloadRequests
    file_reload: Callable[[str], Awaitable[ReloadResult]] | None

    def _bind(self, specs: list[ListenerSpec]) -> Sockets:
        raise NotImplementedError

    def _sockets_for(
        self, index: int, socks: Sockets
    ) -> tuple[list[tuple[object, ...]], list[socket.socket]]:
        raise NotImplementedError

    async def ask(
        self,
        member: WorkerSlot,
        message: Message,
        wait_s: float,
        socks: list[socket.socket] | None = None,
    ) -> Message:
        raise NotImplementedError

    def request_reload(self, reason: str) -> None:
        self._reload_requests.request(reason)

    async def reload_loop(self) -> None:
        await self._reload_requests.serve(self.reload)

    async def reload(self, reason: str, data: bytes | None = None) -> ReloadResult:
        """Reload from the file, or apply ``data`` (the Kubernetes source's document). With
        ``--kubernetes`` a reload without data reads the file's settings (``file_reload``)."""
        if data is None and self.file_reload is not None:
            return await self.file_reload(reason)
        async with self._reload_lock:
            return await self._reload(reason, data)

    async def _reload(self, reason: str, data: bytes | None) -> ReloadResult:
        started = time.perf_counter()
        try:
            data = read_config_file(self.path) if data is None else data
            if content_hash(data) == content_hash(self.data):
                return ReloadResult("unchanged", time.perf_counter() - started)
            config = load_text(data, self.path, self.options)
            diff = diff_configs(self.config, config)
            added = self._bind(list(diff.listeners_added))
        except ConfigError as error:
            return self._failed(reason, started, [str(p) for p in error.problems])
        except ListenerError as error:
            return self._failed(reason, started, [f"{self.path}: {error}"])
        self.slots_table = self.slots.assign(config, self.counts)
        replies = await asyncio.gather(
            *(
                self.ask(
                    member,
                    {
                        "type": "reload",
                        "reason": reason,
                        "data": data,
                        "keys": self._sockets_for(member.index, added)[0],
                        "slots": self.slots_table,
                    },
                    REPLY_TIMEOUT_S,
                    self._sockets_for(member.index, added)[1],
                )
                for member in self.members
                if member.serving
            ),
            return_exceptions=True,
        )
        problems = sorted(
            {
                problem
                for reply in replies
                if isinstance(reply, dict)
                for problem in reply.get("problems", ())
            }
            | {f"a worker did not answer: {r}" for r in replies if isinstance(r, BaseException)}
        )
        applied = any(isinstance(r, dict) and r.get("outcome") == "applied" for r in replies)
        if not applied and problems:
            for socks in added.values():
                for sock in socks:
                    sock.close()
            return self._failed(reason, started, problems)
        self._commit(config, data, diff.listeners_removed, added)
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

    def _commit(
        self,
        config: Config,
        data: bytes,
        removed: tuple[ListenerSpec, ...],
        added: Sockets,
    ) -> None:
        for spec in removed:
            for sock in self.sockets.pop(spec.identity, []):
                sock.close()  # the workers closed theirs: the listener is gone
        self.sockets.update(added)
        self.config = config
        self.data = data

    def _failed(self, reason: str, started: float, problems: list[str]) -> ReloadResult:
        self.reloads_failed += 1
        return reload_failed(reason, started, problems)
