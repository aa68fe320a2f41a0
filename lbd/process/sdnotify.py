"""systemd's service notifications (sd_notify(3)), so that lbd runs as a ``Type=notify`` unit.

systemd hands the service a datagram socket in ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the
abstract namespace); the service sends newline-separated ``KEY=VALUE`` lines to it:
``READY=1`` once it serves (``systemctl start`` returns then, and units ordered after lbd
start), ``STOPPING=1`` when shutdown begins, and ``WATCHDOG=1`` at least every
``$WATCHDOG_USEC`` when the unit sets ``WatchdogSec=``; a service that misses it is killed and,
with ``Restart=on-failure``, started again. Not under systemd (no ``$NOTIFY_SOCKET``) every call
here does nothing. Sending never raises and never blocks: a notification that cannot be sent
is logged (once) and lbd goes on serving.

The keep-alives come from a task on the event loop, so they stop when the loop stops turning:
a loop stuck in a busy callback is what the watchdog is there to catch.

A seamless restart (``lbd restart``) replaces lbd by a process with another pid. The successor
sends ``MAINPID=`` with its ``READY=1`` (systemd accepts that from a process other than the
main one with ``NotifyAccess=all``), and the predecessor, which drains and exits, stays silent:
its ``STOPPING=1`` would stop the whole unit.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, MutableMapping

import structlog

log = structlog.get_logger("lbd.process.sdnotify")

# Keep-alives at half the watchdog timeout, as sd_watchdog_enabled(3) recommends: one late
# turn of the loop must not cost the service its life.
WATCHDOG_FRACTION = 0.5


def socket_address(value: str) -> bytes | None:
    """``$NOTIFY_SOCKET`` as an AF_UNIX address: an absolute path, or ``@name`` for the abstract
    namespace (a leading NUL byte). None for anything else (systemd 254's ``vsock:`` too)."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    return None


def watchdog_interval(environ: MutableMapping[str, str], pid: int) -> float | None:
    """Seconds between keep-alives, or None when systemd expects none from this process.

    ``$WATCHDOG_PID`` names the process the watchdog is for: another pid means it is not ours.
    When it names us it is removed from the environment, so that a successor we start (a
    seamless restart, which becomes the main process) keeps the watchdog fed."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID")
    if owner is not None:
        if owner.strip() != str(pid):
            return None
        del environ["WATCHDOG_PID"]
    if not usec.isdigit() or int(usec) == 0:
        if usec:
            log.warning("ignoring a malformed WATCHDOG_USEC", value=usec[:32])
        return None
    return int(usec) / 1_000_000 * WATCHDOG_FRACTION


class ServiceNotifier:
    """What one lbd tells systemd about itself. Create one per lbd (the process systemd
    started, or its successor), never in a supervised worker: systemd knows only the main pid.
    """

    __slots__ = ("_failed", "_sock", "_tasks", "address", "interval_s")

    def __init__(self, address: bytes | None, interval_s: float | None = None) -> None:
        self.address = address
        self.interval_s = interval_s if address is not None else None
        self._sock: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._failed = False

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None, *, enabled: bool = True
    ) -> ServiceNotifier:
        """The notifier systemd asked for through the environment (``os.environ`` by default);
        one that does nothing when ``enabled`` is false or there is no ``$NOTIFY_SOCKET``."""
        environ = os.environ if environ is None else environ
        value = environ.get("NOTIFY_SOCKET", "")
        if not enabled or not value:
            return cls(None)
        address = socket_address(value)
        if address is None:
            log.warning("NOTIFY_SOCKET is not a unix socket path; not notifying", value=value[:64])
            return cls(None)
        return cls(address, watchdog_interval(environ, os.getpid()))

    @property
    def active(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; True when it was sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)  # a full queue drops, it never stalls the loop
            self._sock.sendto("\n".join(assignments).encode(), self.address)
        except OSError as error:
            if not self._failed:  # once: the watchdog would repeat it every few seconds
                log.warning("cannot notify systemd", state=assignments[0], error=str(error))
            self._failed = True
            return False
        return True

    def start(self, stopping: asyncio.Event, handed_off: Callable[[], bool]) -> None:
        """Keep-alives from now on (when systemd wants them), and ``STOPPING=1`` once
        ``stopping`` is set, unless ``handed_off()`` says a successor serves by then."""
        if self.address is None:
            return
        if self.interval_s is not None:
            self._tasks.append(asyncio.create_task(self._keep_alive(self.interval_s)))
        self._tasks.append(asyncio.create_task(self._on_stopping(stopping, handed_off)))

    def ready(self) -> None:
        """lbd serves: listeners bound, first config applied, admin API up."""
        if self.notify("READY=1", f"MAINPID={os.getpid()}"):
            log.info("systemd notified", state="READY=1")

    async def _keep_alive(self, interval_s: float) -> None:
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval_s)

    async def _on_stopping(self, stopping: asyncio.Event, handed_off: Callable[[], bool]) -> None:
        await stopping.wait()
        if handed_off():
            for task in self._tasks:  # the successor feeds the watchdog now
                if task is not asyncio.current_task():
                    task.cancel()
            return
        self.notify("STOPPING=1")

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
