"""Seamless restart: the next lbd takes over the listening sockets of the running one.

As HAProxy's ``-x`` and Envoy's hot restart do, the sockets themselves move (SCM_RIGHTS over a
unix socket), so the kernel's listening sockets and their accept queues never close: a client
that connects during the restart is accepted by the old process or by the new one, never
refused. The order, with the running lbd "old" and its successor "new":

1. ``lbd restart`` (or SIGUSR2) makes old start new: the same command line plus ``--takeover``.
2. new connects to old's restart socket (mode 0600 and the peer's uid checked: only the owner
   reaches it); old stops listening there and sends every TCP listening socket and the admin
   socket, keyed by (protocol, address, port) / ``ADMIN_KEY``.
3. new binds nothing it was given, starts serving (workers and all), and says "ready".
4. old stops accepting, drains each connection up to its drainTimeout, and exits; new now
   listens on the restart socket. If new fails before step 3, old keeps serving and listens
   for the next try.

UDP listeners are not handed over: a supervised lbd binds them per worker with SO_REUSEPORT, so
new joins old's group; a single-process lbd re-binds them once old has closed them (datagrams
in between are lost; UDP has no connection to refuse).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable

import structlog

from lbd.net.sockets import InheritedSockets
from lbd.process.channel import Channel
from lbd.process.messages import HandoffReady, HandoffSockets, SocketKey

log = structlog.get_logger("lbd.process.handoff")

ADMIN_KEY: SocketKey = ("admin",)
READY_TIMEOUT_S = 120.0  # new's start-up, workers included
TAKEOVER_TIMEOUT_S = 10.0

SocketSource = Callable[[], dict[SocketKey, socket.socket]]


class HandoffError(Exception):
    """No running lbd handed its sockets over (not running, no permission, it went away)."""


def successor_argv(takeover: str) -> list[str]:
    """This process's command line, to run again with ``--takeover``."""
    args = [a for a in sys.argv[1:] if not a.startswith("--takeover")]
    return [sys.executable, "-m", "lbd", *args, f"--takeover={takeover}"]


class HandoffServer:
    """The running lbd's end: waits for a successor and hands it the listening sockets."""

    def __init__(self, path: str, sockets: SocketSource, on_handed_off: Callable[[], None]):
        self.path = path
        self.sockets = sockets
        self.on_handed_off = on_handed_off
        self.restarts_failed = 0
        self._listener: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._successor: subprocess.Popen[bytes] | None = None
        self.done = False

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a predecessor's, or left by a crash (it no longer serves)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # created 0600: no window in which others could connect
        try:
            sock.bind(self.path)
        finally:
            os.umask(old_umask)
        sock.listen(1)
        sock.setblocking(False)
        self._listener = sock
        self._task = asyncio.create_task(self._serve())
        log.info("restart socket listening", path=self.path)

    def spawn_successor(self) -> None:
        """SIGUSR2 / ``lbd restart``: start the next lbd, which then takes over."""
        if self.done or (self._successor is not None and self._successor.poll() is None):
            log.warning("restart already under way")
            return
        argv = successor_argv(self.path)
        log.info("restart: starting the next lbd", argv=argv)
        # Not an asyncio child: it outlives this process and its loop. Its own session, so a
        # Ctrl+C meant for us is not for it. ``poll`` above reaps one that failed.
        self._successor = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)

    async def _serve(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            if uid != os.getuid():
                log.warning("restart socket: refused a peer of another user", uid=uid)
                conn.close()
                continue
            if await self._hand_over(conn):
                return

    async def _hand_over(self, conn: socket.socket) -> bool:
        """Give ``conn``'s process our sockets; True once it serves them."""
        ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def on_message(message: object, socks: list[socket.socket]) -> None:
            for sock in socks:
                sock.close()
            if isinstance(message, HandoffReady) and not ready.done():
                ready.set_result(True)

        def on_close() -> None:
            if not ready.done():
                ready.set_result(False)

        channel = Channel(conn, on_message, on_close)
        sockets = self.sockets()
        channel.send(HandoffSockets(list(sockets)), list(sockets.values()))
        log.info("restart: sockets handed to the next lbd", sockets=len(sockets))
        try:
            ok = await asyncio.wait_for(ready, READY_TIMEOUT_S)
        except TimeoutError:
            ok = False
        channel.close()
        if not ok:
            self.restarts_failed += 1
            log.error("restart failed: the next lbd did not start; still serving")
            return False
        self.done = True
        log.info("restart: the next lbd serves; draining and exiting")
        self.close(unlink=False)  # the path is the successor's now
        self.on_handed_off()
        return True

    def close(self, unlink: bool = True) -> None:
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if unlink and not self.done:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)


class Takeover:
    """The successor's end: the predecessor's sockets, and telling it when we serve."""

    def __init__(self, inherited: InheritedSockets, channel: Channel | None) -> None:
        self.inherited = inherited
        self._channel = channel

    def confirm(self) -> None:
        """We serve: the predecessor may stop accepting now."""
        self.inherited.close()  # sockets of listeners our config no longer has
        if self._channel is not None and not self._channel.closed:
            self._channel.send(HandoffReady())
            self._channel.flush_blocking()

    def close(self) -> None:
        self.inherited.close()
        if self._channel is not None:
            self._channel.close()


async def take_over(path: str) -> Takeover:
    """Connect to the running lbd at ``path`` and receive its listening sockets."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    got: asyncio.Future[InheritedSockets] = loop.create_future()

    def on_message(message: object, socks: list[socket.socket]) -> None:
        if isinstance(message, HandoffSockets) and not got.done():
            got.set_result(InheritedSockets(dict(zip(message.keys, socks, strict=True))))
        else:
            for s in socks:
                s.close()

    def on_close() -> None:
        if not got.done():
            got.set_exception(HandoffError(f"the lbd at {path} closed the restart socket"))

    try:
        await asyncio.wait_for(loop.sock_connect(sock, path), TAKEOVER_TIMEOUT_S)
    except (OSError, TimeoutError) as error:
        sock.close()
        raise HandoffError(f"no running lbd at {path}: {error}") from None
    channel = Channel(sock, on_message, on_close)
    try:
        inherited = await asyncio.wait_for(got, TAKEOVER_TIMEOUT_S)
    except (HandoffError, TimeoutError) as error:
        channel.close()
        raise HandoffError(str(error) or f"no sockets from the lbd at {path}") from None
    log.info("restart: took over listening sockets", sockets=len(inherited.sockets), path=path)
    return Takeover(inherited, channel)


class Restart:
    """How this lbd takes part in seamless restarts: the restart socket it listens on (None:
    it does not), and the predecessor it took its sockets from (None: it bound its own)."""

    __slots__ = ("path", "server", "takeover")

    def __init__(self, path: str | None, takeover: Takeover | None = None) -> None:
        self.path = path
        self.takeover = takeover
        self.server: HandoffServer | None = None

    @property
    def inherited(self) -> InheritedSockets | None:
        return self.takeover.inherited if self.takeover is not None else None

    def take_admin(self) -> socket.socket | None:
        return self.takeover.inherited.take(ADMIN_KEY) if self.takeover is not None else None

    def serving(self, sockets: SocketSource, on_handed_off: Callable[[], None]) -> None:
        """We serve: release the predecessor, then wait for a successor (SIGUSR2)."""
        if self.takeover is not None:
            self.takeover.confirm()
            self.takeover.close()
        if self.path is None:
            return
        self.server = HandoffServer(self.path, sockets, on_handed_off)
        self.server.start()
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, self.server.spawn_successor)

    @property
    def handed_off(self) -> bool:
        return self.server is not None and self.server.done

    def close(self) -> None:
        if self.takeover is not None:
            self.takeover.close()
        if self.server is not None:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR2)
            self.server.close()
