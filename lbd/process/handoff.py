"""Seamless restart: the next lbd takes over the listening sockets of the running one.

As HAProxy's ``-x`` and Envoy's hot restart do, the sockets themselves move (SCM_RIGHTS over a
unix socket), so the kernel's listening sockets and their queues never close: a client that
connects during the restart is accepted by the old process or by the new one, never refused,
and a datagram is read by one or the other, never dropped. The order, with the running lbd
"old" and its successor "new":

1. ``lbd restart`` (or SIGUSR2) makes old start new: the same command line plus ``--takeover``.
2. new connects to old's restart socket (mode 0600 and the peer's uid checked: only the owner
   reaches it); old sends every listening socket (TCP and UDP; a supervisor's workers' own UDP
   sockets too, see ``lbd.process.udp_handoff``) and the admin socket, keyed by (protocol,
   address, port) / ``ADMIN_KEY``.
3. new binds nothing it was given, starts serving (workers and all), and says "ready", with the
   keys of the sockets it serves.
4. old stops accepting and reading; each connection drains up to its drainTimeout, and so do
   the UDP sessions of the sockets new serves (their replies still leave through old's copy);
   then old exits. new now listens on the restart socket.

If new fails before step 3, old keeps serving, reaps new, makes the pid file name itself again
(new also hands it back as it exits: ``lbd.process.pidfile``), and listens for the next try.
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
from collections.abc import Awaitable, Callable

import structlog

from lbd.net.sockets import InheritedSockets
from lbd.process import pidfile
from lbd.process.channel import Channel, ChannelClosed
from lbd.process.messages import HandoffReady, HandoffSockets, SocketKey

log = structlog.get_logger("lbd.process.handoff")

ADMIN_KEY: SocketKey = ("admin",)
READY_TIMEOUT_S = 120.0  # new's start-up, workers included
TAKEOVER_TIMEOUT_S = 10.0

# What a successor gets. The sockets are the handoff's to close once sent: copies (``dup``),
# so that no listener of ours can close one while it waits in the channel.
SocketSource = Callable[[], Awaitable[dict[SocketKey, socket.socket]]]
Taken = frozenset[SocketKey]


class HandoffError(Exception):
    """No running lbd handed its sockets over (not running, no permission, it went away)."""


def successor_argv(takeover: str) -> list[str]:
    """This process's command line, to run again with ``--takeover``."""
    args = [a for a in sys.argv[1:] if not a.startswith("--takeover")]
    return [sys.executable, "-m", "lbd", *args, f"--takeover={takeover}"]


def peer_credentials(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a unix socket."""
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid


class HandoffServer:
    """The running lbd's end: waits for a successor and hands it the listening sockets; starts
    one on SIGUSR2, and reaps it (giving the pid file back to us) if it fails."""

    def __init__(
        self,
        path: str,
        sockets: SocketSource,
        on_handed_off: Callable[[Taken], None],
        pid_file: str | None = None,
    ) -> None:
        self.path = path
        self.sockets = sockets
        self.on_handed_off = on_handed_off
        self.pid_file = pid_file
        self.restarts_failed = 0
        self._listener: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._successor: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None  # readable once our successor has exited
        self._reported = 0  # the pid of the last successor whose failure was logged
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
        if self._successor is not None and self._pidfd is not None:
            self._successor_exited(self._successor)  # it has exited; the notice is on its way
        argv = successor_argv(self.path)
        try:
            # Not an asyncio child: it outlives this process and its loop. Its own session, so
            # a Ctrl+C meant for us is not for it.
            self._successor = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, start_new_session=True
            )
        except OSError as error:  # out of memory or descriptors: nothing started
            self.restarts_failed += 1
            log.error("restart failed: cannot start the next lbd; still serving", error=str(error))
            return
        log.info("restart: starting the next lbd", argv=argv, pid=self._successor.pid)
        self._watch(self._successor)

    def _watch(self, process: subprocess.Popen[bytes]) -> None:
        """Be told when ``process`` exits (a pidfd is readable then), to reap it at once."""
        try:
            fd = os.pidfd_open(process.pid)
        except OSError as error:  # Linux < 5.3: a failure shows when its channel closes
            log.warning("cannot watch the next lbd", error=error.strerror or str(error))
            return
        self._pidfd = fd
        asyncio.get_running_loop().add_reader(fd, self._successor_exited, process)

    def _unwatch(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def _successor_exited(self, process: subprocess.Popen[bytes]) -> None:
        self._unwatch()
        code = process.poll()  # reaps it: no zombie is left behind
        if not self.done:
            self._failed(process.pid, f"it exited with code {code}")

    def _failed(self, pid: int, reason: str) -> None:
        """The successor ``pid`` will not serve: say so once, and name us in the pid file."""
        if pid != self._reported:
            self._reported = pid
            self.restarts_failed += 1
            log.error(
                "restart failed: the next lbd did not start; still serving", pid=pid, reason=reason
            )
        if self.pid_file is None:
            return
        try:
            if pidfile.reclaim(self.pid_file, pid):
                log.info("pid file names this lbd again", path=self.pid_file, pid=os.getpid())
        except OSError as error:
            log.error("cannot write the pid file", path=self.pid_file, error=str(error))

    async def _serve(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            pid, uid = peer_credentials(conn)
            if uid != os.getuid():
                log.warning("restart socket: refused a peer of another user", uid=uid)
                conn.close()
                continue
            if await self._hand_over(conn, pid):
                return

    async def _hand_over(self, conn: socket.socket, pid: int) -> bool:
        """Give ``conn``'s process (``pid``) our sockets; True once it serves them."""
        ready: asyncio.Future[Taken | None] = asyncio.get_running_loop().create_future()

        def on_message(message: object, socks: list[socket.socket]) -> None:
            for sock in socks:
                sock.close()
            if isinstance(message, HandoffReady) and not ready.done():
                ready.set_result(frozenset(message.taken))

        def on_close() -> None:
            if not ready.done():
                ready.set_result(None)

        channel = Channel(conn, on_message, on_close)
        sockets: dict[SocketKey, socket.socket] = {}
        taken: Taken | None = None
        try:
            sockets = await self.sockets()
            channel.send(HandoffSockets(list(sockets)), list(sockets.values()))
            log.info("restart: sockets handed to the next lbd", sockets=len(sockets), pid=pid)
            taken = await asyncio.wait_for(ready, READY_TIMEOUT_S)
        except ChannelClosed:
            pass  # it went away before it got them
        except TimeoutError:
            ours = self._successor
            if ours is not None and ours.pid == pid and ours.poll() is None:
                ours.terminate()  # our child, by its pid: it drains what it accepted, exits
        finally:
            channel.close()  # nothing of ours waits in it any more: the copies can close
            for sock in sockets.values():
                sock.close()
        if taken is None:
            self._failed(pid, "it did not say it serves")
            return False
        self.done = True
        log.info("restart: the next lbd serves; draining and exiting")
        self.close(unlink=False)  # the path is the successor's now
        self.on_handed_off(taken)
        return True

    def close(self, unlink: bool = True) -> None:
        self._unwatch()
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

    def __init__(
        self, inherited: InheritedSockets, channel: Channel | None, predecessor: int = 0
    ) -> None:
        self.inherited = inherited
        self.predecessor = predecessor  # its pid: the pid file names it again if we fail
        self.confirmed = False
        self._channel = channel

    def confirm(self) -> None:
        """We serve: the predecessor may stop accepting (and reading what we took) now."""
        taken = list(self.inherited.taken)
        self.inherited.close()  # sockets of listeners our config no longer has
        if self._channel is not None and not self._channel.closed:
            self._channel.send(HandoffReady(taken))
            self._channel.flush_blocking()
        self.confirmed = True

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
    predecessor, uid = peer_credentials(sock)
    if uid != os.getuid():  # not ours: its sockets could be anything
        sock.close()
        raise HandoffError(f"the restart socket {path} belongs to another user (uid {uid})")
    channel = Channel(sock, on_message, on_close)
    try:
        inherited = await asyncio.wait_for(got, TAKEOVER_TIMEOUT_S)
    except (HandoffError, TimeoutError) as error:
        channel.close()
        raise HandoffError(str(error) or f"no sockets from the lbd at {path}") from None
    log.info("restart: took over listening sockets", sockets=len(inherited.sockets), path=path)
    return Takeover(inherited, channel, predecessor)


class Restart:
    """How this lbd takes part in seamless restarts: the restart socket it listens on (None:
    it does not), the predecessor it took its sockets from (None: it bound its own), and the
    pid file both name."""

    __slots__ = ("path", "pid_file", "server", "successor_keys", "takeover")

    def __init__(
        self, path: str | None, takeover: Takeover | None = None, *, pid_file: str | None = None
    ) -> None:
        self.path = path
        self.takeover = takeover
        self.pid_file = pid_file
        self.server: HandoffServer | None = None
        self.successor_keys: Taken = frozenset()  # the sockets our successor serves

    @property
    def inherited(self) -> InheritedSockets | None:
        return self.takeover.inherited if self.takeover is not None else None

    def take_admin(self) -> socket.socket | None:
        return self.takeover.inherited.take(ADMIN_KEY) if self.takeover is not None else None

    def serving(self, sockets: SocketSource, on_handed_off: Callable[[], None]) -> None:
        """We serve: release the predecessor, then wait for a successor (SIGUSR2). From here
        on SIGHUP and SIGUSR2 have their handlers: deliver those sent while we started."""
        if self.takeover is not None:
            self.takeover.confirm()
            self.takeover.close()
        if self.path is not None:

            def handed_off(taken: Taken) -> None:
                self.successor_keys = taken
                on_handed_off()

            self.server = HandoffServer(self.path, sockets, handed_off, self.pid_file)
            self.server.start()
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGUSR2, self.server.spawn_successor)
        pidfile.accept_signals()

    @property
    def handed_off(self) -> bool:
        return self.server is not None and self.server.done

    def close(self) -> None:
        if self.takeover is not None:
            if not self.takeover.confirmed and self.pid_file and self.takeover.predecessor:
                try:  # we never served: the lbd we meant to replace still does
                    pidfile.hand_back(self.pid_file, self.takeover.predecessor)
                except OSError as error:
                    log.error("cannot write the pid file", path=self.pid_file, error=str(error))
            self.takeover.close()
        if self.server is not None:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR2)
            self.server.close()
