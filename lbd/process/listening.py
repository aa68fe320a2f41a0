"""The supervisor's TCP listening sockets: bound once here, shared by every worker.

Every worker accepts from the same sockets (measured against one SO_REUSEPORT socket per
worker in docs/configuration.md, "Workers"): the accept queue belongs to the supervisor, so a
worker that dies or is replaced loses no queued connection, a reload binds each new listener
once, and a seamless restart hands one set of sockets to the next lbd. UDP listeners are bound
by each worker with SO_REUSEPORT instead: the kernel hashes a client's address to one socket,
so a client's datagrams keep reaching the worker that holds its session.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Literal

from lbd.config.model import Config, ListenerSpec, listeners_of
from lbd.net.sockets import InheritedSockets, bind_tcp_listener
from lbd.process.messages import SocketKey
from lbd.runtime.runtime import ListenerError

SocketMode = Literal["shared", "reuseport"]
Sockets = dict[SocketKey, list[socket.socket]]


def listener_specs(config: Config) -> list[ListenerSpec]:
    return [spec for s in config.services for spec in listeners_of(s, config.node)]


class ListeningSockets:
    """One socket per TCP listener (``reuseport``: one per worker) and who gets which."""

    def __init__(self, workers: int, mode: SocketMode, inherited: InheritedSockets) -> None:
        self.mode = mode
        self.copies = workers if mode == "reuseport" else 1
        self.inherited = inherited  # a predecessor's (seamless restart): taken before binding
        self.sockets: Sockets = {}

    def bind(self, specs: Iterable[ListenerSpec]) -> Sockets:
        """Bind the TCP listeners of ``specs`` not bound yet; all of them or none (raises
        ListenerError naming the one that failed). They are not ours until ``commit``."""
        bound: Sockets = {}
        try:
            for spec in specs:
                if spec.protocol != "TCP" or spec.identity in self.sockets:
                    continue
                bound[spec.identity] = self._bind_one(spec)
        except OSError as error:
            self.discard(bound)
            raise ListenerError(
                f"cannot bind {spec.describe()} ({spec.kind} of {spec.service}): "
                f"{error.strerror or error}"
            ) from None
        return bound

    def _bind_one(self, spec: ListenerSpec) -> list[socket.socket]:
        inherited = self.inherited.take(spec.identity)
        if inherited is not None:
            return [inherited]
        reuse = self.mode == "reuseport"
        first = bind_tcp_listener(spec.address, spec.port, reuse_port=reuse)
        socks = [first]
        port = first.getsockname()[1]
        try:
            for _ in range(self.copies - 1):
                socks.append(bind_tcp_listener(spec.address, port, reuse_port=True))
        except OSError:
            for sock in socks:
                sock.close()
            raise
        return socks

    def commit(self, added: Sockets, removed: Iterable[ListenerSpec] = ()) -> None:
        """A config that binds ``added`` and drops ``removed`` now runs (every worker closed
        its copies of the removed ones)."""
        for spec in removed:
            self.discard({spec.identity: self.sockets.pop(spec.identity, [])})
        self.sockets.update(added)

    @staticmethod
    def discard(sockets: Sockets) -> None:
        for socks in sockets.values():
            for sock in socks:
                sock.close()

    def for_worker(
        self, index: int, sockets: Sockets | None = None
    ) -> tuple[list[SocketKey], list[socket.socket]]:
        """The keys and the sockets worker ``index`` gets (of ``sockets``; default all)."""
        socks = self.sockets if sockets is None else sockets
        keys = list(socks)
        return keys, [socks[key][index % len(socks[key])] for key in keys]

    def handoff(self) -> dict[SocketKey, socket.socket]:
        """One socket per TCP listener, for the next lbd of a seamless restart."""
        return {key: socks[0] for key, socks in self.sockets.items()}

    def close(self) -> None:
        self.discard(self.sockets)
        self.sockets.clear()
