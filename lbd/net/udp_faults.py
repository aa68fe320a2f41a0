"""UDP faults: drop, delay, duplicate and reorder datagrams, each with a probability per
datagram (netem's, per direction; docs/faults.md).

A UDP session of a port with UDP faults is a ``FaultyUdpSession``, chosen when the session
starts (``lbd.net.udp_listener``), so sessions of ports without faults run exactly as before.
When a port's faults change at runtime, ``follow`` hands each open session over to the other
kind on the same socket (``UdpSession.hand_over``): the next datagram either way sees the
change. For each datagram, every fault of its direction and scope rolls its probability:
``drop`` ends it there; ``duplicate`` sends it once more; ``delay`` holds it ``delay`` ±
``jitter`` (so jitter can reorder, as in netem); ``reorder`` holds it back until a datagram of
the same direction that is not held has gone (or ``delay`` at most), as netem sends the share
of packets it does not reorder at once and the others later.
"""

from __future__ import annotations

import asyncio
from typing import Any

from lbd.endpoints.faults import LiveFault, RouteFaults
from lbd.net.udp_session import BATCH, UdpSession

Held = tuple[list[bytes], asyncio.TimerHandle]  # datagrams held back, the timer that frees them
MAX_HELD = 64  # per direction of a session: past this, a datagram that would be held is dropped


class FaultyUdpSession(UdpSession):
    """A UDP session whose datagrams pass through its port's UDP faults, both ways."""

    __slots__ = ("held",)

    def __init__(self, *args: Any) -> None:  # as UdpSession's
        super().__init__(*args)
        self.held: list[Held | None] = [None, None]  # reorder: upward, downward

    def forward(self, data: memoryview) -> bool:
        faults = self.listener.route.faults
        if faults is None:
            return super().forward(data)
        self._pass(faults, True, data)
        return not self.closed

    def on_readable(self) -> None:
        """Endpoint → client, as ``UdpSession.on_readable``, each reply through the faults."""
        listener = self.listener
        faults = listener.route.faults
        if faults is None:
            super().on_readable()
            return
        if self.closed or listener.sock is None:
            return
        view = listener.view
        received = nbytes = 0
        for _ in range(BATCH):
            try:
                n = self.sock.recv_into(view)
            except BlockingIOError:
                break
            except OSError as error:
                self._upstream_error(error, reading=True)
                break
            received += 1
            nbytes += n
            if self.replies is None or self.take_reply():
                self._pass(faults, False, view[:n])
        if received:
            self.last_activity = listener.loop.time()
            stats = listener.route.stats
            stats.udp_upstream_datagrams_received_total += received
            stats.udp_upstream_bytes_received_total += nbytes
            if self.replies == 0:
                self.all_replied()

    def _pass(self, faults: RouteFaults, upward: bool, data: memoryview) -> None:
        """One datagram through the faults of its direction; then on its way (or not)."""
        copies, delay = 1, 0.0
        reorder: LiveFault | None = None
        for fault in faults.udp:
            spec = fault.spec
            if not (spec.upstream if upward else spec.downstream):
                continue
            if not fault.covers(self.endpoint) or not faults.roll(spec.probability):
                continue
            fault.stats.fault_applied_total += 1
            if spec.type == "drop":
                fault.stats.fault_bytes_discarded_total += len(data)
                return
            if spec.type == "duplicate":
                copies += 1
            elif spec.type == "delay":
                jitter = faults.rng.uniform(-spec.jitter, spec.jitter) if spec.jitter else 0.0
                delay += max(0.0, spec.delay + jitter)
                fault.stats.fault_bytes_delayed_total += len(data)
            else:  # reorder
                reorder = fault
        loop = self.listener.loop
        side = 0 if upward else 1
        if reorder is not None:
            reorder.stats.fault_bytes_delayed_total += len(data)
            held = self.held[side]
            if held is None:
                timer = loop.call_later(reorder.spec.delay, self._release, side)
                held = self.held[side] = ([], timer)
            if len(held[0]) < MAX_HELD:
                held[0].append(bytes(data))
            return
        if delay > 0:
            loop.call_later(delay, self._send, upward, bytes(data), copies)
            return
        self._send(upward, data, copies)
        self._release(side)  # datagrams held back by reorder leave after this one

    def _release(self, side: int) -> None:
        held = self.held[side]
        if held is not None:
            self.held[side] = None
            held[1].cancel()
            for data in held[0]:
                self._send(side == 0, data, 1)

    def _send(self, upward: bool, data: bytes | memoryview, copies: int) -> None:
        if upward and self.sock.fileno() < 0:
            return  # the session ended meanwhile (a reply held back still leaves: in flight)
        for _ in range(copies):
            if upward:
                super().forward(data)  # type: ignore[arg-type]  # bytes work as a memoryview
            else:
                self._reply(data)

    def _reply(self, data: bytes | memoryview) -> None:
        listener = self.listener
        out = listener.sock
        if out is None:
            return
        try:
            if self.ancillary is None:
                out.sendto(data, self.client)
            else:
                out.sendmsg([data], self.ancillary, 0, self.client)
        except OSError:
            listener.route.stats.udp_errors_total.downstream_tx += 1  # dropped, as without faults
            return
        listener.route.stats.udp_downstream_datagrams_sent_total += 1


def session_kind(faults: RouteFaults | None) -> type[UdpSession]:
    """The kind of session a port's faults ask for."""
    return FaultyUdpSession if faults is not None and faults.udp else UdpSession


def follow(sessions: dict[object, UdpSession], faults: RouteFaults | None) -> None:
    """A port's faults changed: hand every open session over to the kind they now ask for."""
    kind = session_kind(faults)
    for session in list(sessions.values()):
        if type(session) is not kind:
            session.hand_over(kind)
