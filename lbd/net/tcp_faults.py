"""TCP faults and mirroring, chosen once per connect try (docs/faults.md).

A service port without faults or a mirror never comes here: its connect tries see
``route.faults is None`` and make a plain ``Upstream`` (``lbd.net.connect``). For a port with
some, ``upstream`` decides, once per try, what this connection gets:

- a ``refuse`` fault: the whole connection is reset before any endpoint is tried (port-wide
  faults, rolled on the first try), or the chosen endpoint "refuses" the connect (faults scoped
  to endpoints): lbd counts a failed connect against it, as for a real refusal (outlier
  detection sees it), and tries the next;
- every other fault in scope whose probability roll succeeds, and the mirror if its percent
  roll does: a ``FaultyUpstream``, which puts a ``FaultPipe`` (``lbd.net.fault_pipe``) in each
  direction, between the socket the bytes are read from and the one they are written to; when
  it connects, it starts the connection-wide timers (``reset_peer``, ``timeout``) and the
  mirror's copy;
- nothing: a plain ``Upstream``, exactly as without faults.

The client half stays a plain ``Downstream``: it writes to its upstream (``send``,
``write_eof``) and resumes it (``resume``) as always, and the ``FaultyUpstream`` routes both
directions through its pipes. Its ``out`` is never empty until the client's FIN has reached
the endpoint, so the connection completes only once both pipes have delivered everything, and
a faulty direction never moves to splice (its bytes must pass through Python).
"""

from __future__ import annotations

import _socket
import asyncio
from typing import Any, Protocol

from lbd.config.faultspec import Mirror
from lbd.endpoints.endpoint import UpstreamEndpoint
from lbd.endpoints.faults import LiveFault, RouteFaults
from lbd.endpoints.route import Route
from lbd.net.connections import ConnectionSet
from lbd.net.fault_pipe import DirectionFaults, FaultPipe
from lbd.net.mirror import Shadow
from lbd.net.reactor import HANGUP, READABLE, WRITABLE
from lbd.net.tcp_socket import DONTWAIT, READ_SIZE, VIEW, SocketWriter
from lbd.net.tcp_upstream import ROUNDS, Upstream, UpstreamOwner

BUSY = b"(faults)"  # a FaultyUpstream's ``out`` until the client's FIN has gone through


class Faultable(UpstreamOwner, Protocol):
    """What the faults need of a client connection (``lbd.net.tcp_proxy.Downstream``)."""

    route: Route
    connections: ConnectionSet[Any]


def upstream(
    connection: Faultable,
    endpoint: UpstreamEndpoint,
    faults: RouteFaults,
    tried: list[UpstreamEndpoint],
) -> Upstream | None:
    """The upstream half for this try, or None when a ``refuse`` fault acted: the connection
    has been reset (``connection.closed``), or else ``endpoint`` refused this try."""
    applied: list[LiveFault] = []
    for fault in faults.tcp:
        spec = fault.spec
        if not fault.covers(endpoint):
            continue
        if spec.type != "refuse":
            if faults.roll(spec.probability):
                applied.append(fault)
        elif (spec.endpoints or not tried) and faults.roll(spec.probability):
            fault.stats.fault_applied_total += 1
            if not spec.endpoints:
                _refuse(connection, fault)
            return None
    mirror = faults.mirror
    if mirror is not None and not faults.roll(mirror.percent / 100):
        mirror = None
    if not applied and mirror is None:
        return Upstream(connection, endpoint, tried)
    return FaultyUpstream(connection, endpoint, tried, Arrangement(faults, applied, mirror))


def _refuse(connection: Faultable, fault: LiveFault) -> None:
    fault.stats.fault_cx_cut_total += 1
    connection.route.stats.downstream_cx_refused_total.fault += 1
    connection.finish("fault_refuse", abort=True)


class Arrangement:
    """What one connection took: its faults, their timers, its mirror's copy."""

    __slots__ = ("applied", "faults", "mirror", "shadow", "timers")

    def __init__(
        self, faults: RouteFaults, applied: list[LiveFault], mirror: Mirror | None
    ) -> None:
        self.faults = faults
        self.applied = applied
        self.mirror = mirror  # the port's, when this connection's percent roll took it
        self.shadow: Shadow | None = None
        self.timers: list[asyncio.TimerHandle] = []

    def pipes(
        self, loop: asyncio.AbstractEventLoop, sink: FaultyUpstream
    ) -> tuple[FaultPipe, FaultPipe]:
        """(towards the endpoint, towards the client)."""
        up = DirectionFaults([f for f in self.applied if f.spec.upstream])
        down = DirectionFaults([f for f in self.applied if f.spec.downstream])
        rng = self.faults.rng
        return FaultPipe(loop, up, rng, sink, True), FaultPipe(loop, down, rng, sink, False)

    def start(self, owner: Faultable, sink: FaultyUpstream) -> None:
        """The connection connected: count the faults, start their timers and the copy."""
        loop = owner.loop
        route = owner.route
        for fault in self.applied:
            fault.stats.fault_applied_total += 1
            spec = fault.spec
            if spec.type == "reset_peer":
                reason, abort = "fault_reset_peer", True
            elif spec.type == "timeout" and spec.timeout > 0:
                reason, abort = "fault_timeout", False
            else:
                continue
            self.timers.append(loop.call_later(spec.timeout, sink.cut, fault, reason, abort))
        if self.mirror is not None:
            self.shadow = Shadow(
                loop,
                self.mirror,
                route.stats,
                owner.connections.lingering,
                route.tunables.connect_timeout,
            )

    def ended(self) -> None:
        """The connection is over (or left this endpoint)."""
        for timer in self.timers:
            timer.cancel()
        self.timers = []
        if self.shadow is not None:
            self.shadow.close()
            self.shadow = None


class FaultyUpstream(Upstream):
    """An ``Upstream`` whose connection's bytes, both ways, pass through its faults."""

    __slots__ = ("arrangement", "down", "fin_sent", "owner", "real", "up")

    def __init__(
        self,
        downstream: Faultable,
        endpoint: UpstreamEndpoint,
        tried: list[UpstreamEndpoint],
        arrangement: Arrangement,
    ) -> None:
        super().__init__(downstream, endpoint, tried)
        self.owner = downstream
        self.arrangement = arrangement
        self.out = BUSY
        self.real = SocketWriter(None)  # the endpoint's socket, once connected
        self.up, self.down = arrangement.pipes(downstream.loop, self)
        self.fin_sent = False  # the client's FIN has left for the endpoint

    def connected(self, sock: _socket.socket) -> None:
        super().connected(sock)
        self.real.sock = sock
        owner = self.owner
        if not owner.closed and not self.timed_out:
            self.arrangement.start(owner, self)

    def close(self, abort: bool) -> None:
        self.arrangement.ended()
        self.up.close()
        self.down.close()
        super().close(abort)

    # -- towards the endpoint: what the client half writes ---------------------------------------

    def send(self, data: bytes | memoryview) -> bool:
        piece = bytes(data)  # held past this read: VIEW is read into again
        shadow = self.arrangement.shadow
        if shadow is not None:
            shadow.copy(piece)  # before any fault acts on it
        return self.up.write(piece)

    def write_eof(self) -> None:
        shadow = self.arrangement.shadow
        if shadow is not None:
            shadow.copy_eof()
        self.up.write_eof()

    def on_event(self, events: int) -> None:
        real = self.real
        if events & WRITABLE and (real.out is not None or real.out_eof):
            try:
                drained = real.flush()
            except OSError:
                self.owner.finish("upstream_reset", abort=True)
                return
            if drained:
                self._settle()
                self.up.drained()
        if events & READABLE:
            self.read(events & HANGUP != 0)

    # -- towards the client: what is read from the endpoint --------------------------------------

    def read(self, drain: bool = True) -> None:
        owner = self.owner
        sock = self.sock
        for _ in range(ROUNDS):
            if sock is None or not self.reading or self.ended or owner.closed:
                return
            try:
                count = sock.recv_into(VIEW, READ_SIZE, DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                self.reset()
                return
            if not count:
                self.eof()
                return
            owner.sent += count
            owner.last_activity = owner.loop.time()
            if not self.down.write(bytes(VIEW[:count])):
                self.reading = False  # until the pipe holds little again: unhold
                return
            if count < READ_SIZE and not drain:
                return
        owner.loop.call_soon(self.read)

    def pass_eof(self) -> None:
        self.down.write_eof()  # the FIN follows the bytes through the pipe

    def resume(self) -> None:
        """The client's socket took what it held: the pipe goes on."""
        self.down.drained()

    # -- PipeSink: where the pipes' pieces go ------------------------------------------------------

    def deliver(self, upward: bool, data: bytes) -> bool:
        try:
            return self.real.send(data) if upward else self.owner.send(data)
        except OSError:
            self.owner.finish("upstream_reset" if upward else "client_reset", abort=True)
            return False

    def deliver_eof(self, upward: bool) -> None:
        if not upward:
            self.owner.upstream_ended()
            return
        self.real.write_eof()
        self.fin_sent = True
        self._settle()

    def unhold(self, upward: bool) -> None:
        if upward:
            self.owner.upstream_drained()
        else:
            super().resume()

    def cut(self, fault: LiveFault, reason: str, abort: bool = False) -> None:
        owner = self.owner
        if fault.live and not owner.closed:
            fault.stats.fault_cx_cut_total += 1
            owner.finish(reason, abort=abort)

    def _settle(self) -> None:
        """Once the client's FIN has gone through, nothing is kept for the endpoint any more:
        the connection may complete."""
        real = self.real
        if self.fin_sent and real.out is None and not real.out_eof and self.out is not None:
            self.out = None
            self.owner.upstream_drained()
