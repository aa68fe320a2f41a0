"""The supervisor's TCP listening sockets: one SO_REUSEPORT copy per worker, bound here.

With one socket shared by every worker, a burst of connections lands on whichever worker wakes
first (8 simultaneous connections: 8/0 in most rounds); with a copy per worker the kernel
hashes each connection to one copy, so the workers share them. The supervisor keeps every
copy, so a worker that dies or is replaced loses no queued connection (its replacement gets the
same copy, queue and all). A seamless restart hands every copy over; a successor with fewer
workers gives the extra copies to its workers to accept from too (closing one would reset the
connections queued in it), one with more binds more copies. Sockets inherited without
SO_REUSEPORT (an older lbd's one shared socket) stay shared by every worker.

A worker stops listening on a port without endpoints by ``shutdown()`` of its copy and listens
again with ``listen()`` on the same socket (``lbd.net.tcp_listener``): the copies the supervisor
keeps do not keep the port open, and the kernel refuses once every worker has done so. UDP
listeners are bound by each worker with SO_REUSEPORT: the kernel hashes a client's address to
one socket, so a client's datagrams keep reaching the worker that holds its session.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable
from typing import Literal

from lbd.config.model import Config, ListenerSpec, listeners_of
from lbd.net.sockets import InheritedSockets, bind_tcp_listener, copy_key
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
        self.workers = workers
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
        key = spec.identity
        inherited = self.inherited.take(key)
        if inherited is not None:
            socks = [inherited, *self.inherited.take_copies(key)]
            port = spec.port or inherited.getsockname()[1]
            with contextlib.suppress(OSError):  # not SO_REUSEPORT (an older lbd's): shared
                self._add_copies(socks, spec.address, port)
            return socks
        if self.mode != "reuseport":
            return [bind_tcp_listener(spec.address, spec.port)]
        # Every copy bound to the port by number, not 0: a socket bound to port 0 loses its
        # port when it stops listening, and workers stop listening by shutdown().
        probe = None
        port = spec.port
        if not port:
            probe = bind_tcp_listener(spec.address, 0, reuse_port=True)
            port = probe.getsockname()[1]
        bound: list[socket.socket] = []
        try:
            self._add_copies(bound, spec.address, port)
        except OSError:
            self.discard({key: bound})
            raise
        finally:
            if probe is not None:
                probe.close()
        return bound

    def _add_copies(self, socks: list[socket.socket], address: str, port: int) -> None:
        """Bind SO_REUSEPORT copies until there is one per worker."""
        while len(socks) < self.copies:
            socks.append(bind_tcp_listener(address, port, reuse_port=True))

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
        """The keys and the sockets worker ``index`` gets (of ``sockets``; default all): its
        own copy of each listener, and the extra copies it adopts (``copy_key(key, n)``)."""
        socks = self.sockets if sockets is None else sockets
        keys: list[SocketKey] = []
        given: list[socket.socket] = []
        for key, copies in socks.items():
            if len(copies) < self.workers:
                mine = [copies[index % len(copies)]]  # shared
            else:
                mine = copies[index :: self.workers]
            for number, sock in enumerate(mine):
                keys.append(copy_key(key, number))
                given.append(sock)
        return keys, given

    def handoff(self) -> dict[SocketKey, socket.socket]:
        """Every copy of every TCP listener, for the next lbd of a seamless restart."""
        return {
            copy_key(key, number): sock
            for key, copies in self.sockets.items()
            for number, sock in enumerate(copies)
        }

    def close(self) -> None:
        self.discard(self.sockets)
        self.sockets.clear()
