"""One direction of a connection with faults: what its bytes pass through (docs/faults.md).

A connection whose faults applied (``lbd.net.tcp_faults``) has two ``FaultPipe``s, one per
direction, between the socket its bytes are read from and the socket they are written to.
Whatever is written to a pipe passes through the faults of that direction first
(``DirectionFaults``): ``timeout`` discards it, ``limit_data`` cuts it at the limit and ends the
connection once the bytes before the cut have gone, ``latency`` and ``slicer`` give each piece
a time to leave at (never before the piece ahead of it, so the order holds), ``bandwidth`` lets
pieces leave only as its token bucket allows, ``slow_close`` holds the FIN back.

Pieces leave to the pipe's ``PipeSink`` (the connection's upstream half), which writes them to
the socket; a piece the socket could not take whole blocks the pipe until the sink says the
socket drained (``drained``). Flow control stays intact: past ``HIGH_WATER`` bytes held,
``write`` answers False and the source is not read until the pipe is down to ``LOW_WATER``
(``PipeSink.unhold``), as a full socket does without faults.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from typing import Any, Protocol

from lbd.endpoints.faults import LiveFault

HIGH_WATER = 256 * 1024  # bytes held back before the source stops being read
LOW_WATER = 64 * 1024
BURST_SECONDS = 0.02  # bandwidth: the bucket holds this much of its rate (at most MAX_BURST)
MAX_BURST = 64 * 1024
_EOF = object()  # queued markers: pass the FIN on; a limit_data cut once what is before it went
_CUT = object()


class PipeSink(Protocol):
    """Where a pipe's pieces go (``lbd.net.tcp_faults.FaultyUpstream``); ``upward``: the pipe
    from the client to the endpoint."""

    def deliver(self, upward: bool, data: bytes) -> bool:
        """Write ``data``; False: the socket kept some, the pipe waits for ``drained``."""
        ...

    def deliver_eof(self, upward: bool) -> None: ...

    def unhold(self, upward: bool) -> None:
        """The pipe holds little again: its source may be read."""
        ...

    def cut(self, fault: LiveFault, reason: str) -> None:
        """End the connection on a fault's behalf."""
        ...


class DirectionFaults:
    """The faults one direction of one connection took; each is checked for ``live`` per
    piece, so a fault removed at runtime stops acting on the next byte."""

    __slots__ = ("bandwidth", "delays", "limit", "slicer", "slow_close", "timeout")

    def __init__(self, faults: list[LiveFault]) -> None:
        def of(kind: str) -> list[LiveFault]:
            return [fault for fault in faults if fault.spec.type == kind]

        self.delays = of("latency")  # each adds its own delay
        self.bandwidth = min(of("bandwidth"), key=lambda f: f.spec.rate, default=None)
        self.slicer = next(iter(of("slicer")), None)
        self.limit = min(of("limit_data"), key=lambda f: f.spec.bytes, default=None)
        self.timeout = next(iter(of("timeout")), None)
        self.slow_close = max(of("slow_close"), key=lambda f: f.spec.delay, default=None)


def _live(fault: LiveFault | None) -> LiveFault | None:
    return fault if fault is not None and fault.live else None


class FaultPipe:
    """One direction's faults between a source and ``sink``."""

    __slots__ = (
        "_blocked",
        "_eof",
        "_limited",
        "_queue",
        "_refilled",
        "_timer",
        "_tokens",
        "forwarded",
        "holding",
        "last_release",
        "loop",
        "plan",
        "queued",
        "rng",
        "sink",
        "upward",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        plan: DirectionFaults,
        rng: random.Random,
        sink: PipeSink,
        upward: bool,
    ) -> None:
        self.loop = loop
        self.plan = plan
        self.rng = rng
        self.sink: PipeSink | None = sink  # None once closed
        self.upward = upward
        self._queue: deque[list[Any]] = deque()  # [time to leave at, bytes or a marker]
        self.queued = 0  # bytes in the queue
        self.last_release = 0.0
        self.forwarded = 0  # bytes let through (limit_data counts these)
        self._timer: asyncio.TimerHandle | None = None
        self._tokens = 0.0
        self._refilled = loop.time()
        bandwidth = plan.bandwidth
        if bandwidth is not None:
            self._tokens = _burst(bandwidth.spec.rate)
        self._eof = False
        self._limited = False
        self._blocked = False  # the sink's socket holds a piece: wait for ``drained``
        self.holding = False  # past HIGH_WATER: the source is not read

    # -- writing: the faults of this direction -------------------------------------------------

    def write(self, data: bytes) -> bool:
        """Take ``data`` through the faults; False: hold the source until ``unhold``."""
        plan = self.plan
        if self.sink is None or self._eof:
            return True
        if self._limited and plan.limit is not None:  # past the limit: the connection ends
            plan.limit.stats.fault_bytes_discarded_total += len(data)
            return True
        timeout = _live(plan.timeout)
        if timeout is not None:
            timeout.stats.fault_bytes_discarded_total += len(data)
            return True
        limit = _live(plan.limit)
        if limit is not None:
            data = self._limit(limit, data)
        self.forwarded += len(data)
        when = self._delayed(data)
        slicer = _live(plan.slicer)
        if slicer is not None:
            self._slice(slicer, data, when)
        elif data:
            bandwidth = _live(plan.bandwidth)
            if bandwidth is not None and (self._queue or self._tokens < len(data)):
                bandwidth.stats.fault_bytes_delayed_total += len(data)
            self._push(when, data)
        if self._limited:
            self._push(self.last_release, _CUT)
        return not self.holding

    def _delayed(self, data: bytes) -> float:
        """When ``data`` may leave: now, plus every live latency (and its jitter)."""
        when = self.loop.time()
        for fault in self.plan.delays:
            if fault.live:
                spec = fault.spec
                jitter = self.rng.uniform(-spec.jitter, spec.jitter) if spec.jitter else 0.0
                delay = spec.latency + jitter
                if delay > 0:
                    when += delay
                    fault.stats.fault_bytes_delayed_total += len(data)
        return max(when, self.last_release)

    def _limit(self, limit: LiveFault, data: bytes) -> bytes:
        """Cut ``data`` at the limit; past it, the connection ends (``_CUT``)."""
        left = limit.spec.bytes - self.forwarded
        if len(data) < left:
            return data
        kept = data[: max(left, 0)]
        limit.stats.fault_bytes_discarded_total += len(data) - len(kept)
        self._limited = True
        return kept

    def _slice(self, slicer: LiveFault, data: bytes, when: float) -> None:
        spec = slicer.spec
        size, variation, gap = spec.average_size, spec.size_variation, spec.delay
        start = 0
        while start < len(data):
            length = size + (self.rng.randint(-variation, variation) if variation else 0)
            self._push(when, data[start : start + length])
            if gap and start:
                slicer.stats.fault_bytes_delayed_total += min(length, len(data) - start)
            start += length
            when += gap

    def write_eof(self) -> None:
        """The source finished: the FIN follows the bytes (a slow_close holds it back)."""
        if self.sink is None or self._eof:
            return
        self._eof = True
        if _live(self.plan.timeout) is None and not self._limited:  # these swallow the FIN
            slow = _live(self.plan.slow_close)
            when = self.loop.time() + (slow.spec.delay if slow is not None else 0.0)
            self._push(max(when, self.last_release), _EOF)

    def close(self) -> None:
        """The connection ended: drop what is held, and forget the sink."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()
        self.queued = 0
        self.sink = None

    # -- the queue ------------------------------------------------------------------------------

    def _push(self, when: float, item: object) -> None:
        queue = self._queue
        queue.append([when, item])
        if isinstance(item, bytes):
            self.queued += len(item)
        self.last_release = when
        if len(queue) == 1 and self._timer is None and not self._blocked:
            if when <= self.loop.time():
                self._release()
            else:
                self._timer = self.loop.call_at(when, self._release)
        if self.queued > HIGH_WATER:
            self.holding = True

    def drained(self) -> None:
        """The sink's socket took what it held: go on with what is due."""
        self._blocked = False
        if self._timer is None:
            self._release()

    def _release(self) -> None:
        """Send what is due, as the bandwidth allows; wake again when the next piece is."""
        self._timer = None
        queue = self._queue
        now = self.loop.time()
        while queue and not self._blocked:
            sink = self.sink
            if sink is None:
                return
            head = queue[0]
            when, item = head
            if when > now:
                self._timer = self.loop.call_at(when, self._release)
                break
            if item is _EOF or item is _CUT:
                queue.popleft()
                if item is _EOF:
                    sink.deliver_eof(self.upward)
                elif self.plan.limit is not None:
                    sink.cut(self.plan.limit, "fault_limit_data")
                continue
            allowed, wait = self._allowance(len(item), now)
            if not allowed:
                self._timer = self.loop.call_at(now + wait, self._release)
                break
            if allowed < len(item):
                head[1], item = item[allowed:], item[:allowed]
            else:
                queue.popleft()
            self.queued -= len(item)
            self._blocked = not sink.deliver(self.upward, item)
            if wait:  # the bucket let part of the piece go: the rest when it has refilled
                if self.sink is not None:
                    self._timer = self.loop.call_at(now + wait, self._release)
                break
        if self.holding and self.queued <= LOW_WATER and self.sink is not None:
            self.holding = False
            self.sink.unhold(self.upward)

    def _allowance(self, want: int, now: float) -> tuple[int, float]:
        """How many of ``want`` bytes may leave now, and how long until the next may."""
        bandwidth = _live(self.plan.bandwidth)
        if bandwidth is None:
            return want, 0.0
        rate = bandwidth.spec.rate
        burst = _burst(rate)
        tokens = min(burst, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        need = min(want, burst)
        if tokens < need:
            self._tokens = tokens
            return 0, (need - tokens) / rate
        allowed = min(want, int(tokens))
        self._tokens = tokens - allowed
        return allowed, max(0.0, min(want - allowed, burst) - self._tokens) / rate


def _burst(rate: int) -> float:
    return float(max(1, min(int(rate * BURST_SECONDS), MAX_BURST)))
