"""What a connection with faults writes to instead of a real transport (docs/faults.md).

A connection whose faults applied (``lbd.net.tcp_faults``) gets one ``FaultyTransport`` in front
of each of its two transports; the proxy's protocols keep writing, half-closing and pausing as
they always do, unaware of it. Whatever is written passes through the faults of that
direction first (``DirectionFaults``): ``timeout`` discards it, ``limit_data`` cuts it at the
limit and ends the connection, ``latency`` and ``slicer`` give each piece a time to leave at (never
before the piece ahead of it, so the order holds), ``bandwidth`` lets pieces leave only as its
token bucket allows, ``slow_close`` holds the FIN and the close back.

Flow control stays intact: past ``HIGH_WATER`` bytes held, the transport asks its ``peer``
(the one in front of the other socket, where these bytes come from) to stop reading, until it
is down to ``LOW_WATER``. The peer resumes reading only when neither that hold nor the
protocols' own back-pressure (``pause_reading``) stands. A faulty direction never moves to
splice: its bytes must pass through Python to be delayed, cut or copied, so the buffer size
reported is never zero (``lbd.net.splice`` switches only an empty destination).
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from lbd.endpoints.faults import LiveFault
from lbd.net.connections import Abortable

HIGH_WATER = 256 * 1024  # bytes held back before the source stops reading
LOW_WATER = 64 * 1024
BURST_SECONDS = 0.02  # bandwidth: the bucket holds this much of its rate (at most MAX_BURST)
MAX_BURST = 64 * 1024
_EOF = object()  # queued markers: pass the FIN on; close the real transport
_CLOSE = object()


class Copier(Abortable, Protocol):
    """Where a copy of the client's bytes goes (``lbd.net.mirror.Shadow``)."""

    def copy(self, data: bytes) -> None: ...

    def copy_eof(self) -> None: ...


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


class FaultyTransport:
    """Stands in for ``real``: what is written to it reaches ``real`` as ``plan`` says."""

    __slots__ = (
        "_closing",
        "_eof",
        "_held",
        "_holding",
        "_limited",
        "_paused",
        "_queue",
        "_refilled",
        "_timer",
        "_tokens",
        "cut",
        "forwarded",
        "last_release",
        "lingering",
        "loop",
        "mirror",
        "peer",
        "plan",
        "queued",
        "real",
        "rng",
    )

    def __init__(
        self,
        real: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        plan: DirectionFaults,
        rng: random.Random,
        cut: Callable[[LiveFault, str], None],
        lingering: set[Abortable],
    ) -> None:
        self.real = real
        self.loop = loop
        self.plan = plan
        self.rng = rng
        self.cut = cut  # ends the connection on a fault's behalf (limit_data)
        self.lingering = lingering  # where it waits, once closed, to deliver what it holds
        self.peer: FaultyTransport = self  # the other socket's, set by whoever pairs them
        self.mirror: Copier | None = None
        self._queue: deque[list[Any]] = deque()  # [time to leave at, bytes or a marker]
        self.queued = 0
        self.last_release = 0.0
        self.forwarded = 0  # bytes let through (limit_data counts these)
        self._timer: asyncio.TimerHandle | None = None
        self._tokens = 0.0
        self._refilled = loop.time()
        bandwidth = plan.bandwidth
        if bandwidth is not None:
            self._tokens = _burst(bandwidth.spec.rate)
        self._closing = False
        self._eof = False
        self._limited = False
        self._paused = False  # the protocols' back-pressure (the other side's buffer is full)
        self._held = False  # the peer holds too much of what this one reads
        self._holding = False  # this one asked its peer to stop reading

    # -- writing: the faults of this direction -------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.mirror is not None:
            self.mirror.copy(data)
        if self._closing:
            return
        plan = self.plan
        timeout = _live(plan.timeout)
        if timeout is not None:
            timeout.stats.fault_bytes_discarded_total += len(data)
            return
        limit = _live(plan.limit)
        if limit is not None:
            data = self._limit(limit, data)
            if not data:
                return
        self.forwarded += len(data)
        now = self.loop.time()
        when = now
        for fault in plan.delays:
            if fault.live:
                spec = fault.spec
                jitter = self.rng.uniform(-spec.jitter, spec.jitter) if spec.jitter else 0.0
                delay = spec.latency + jitter
                if delay > 0:
                    when += delay
                    fault.stats.fault_bytes_delayed_total += len(data)
        when = max(when, self.last_release)
        slicer = _live(plan.slicer)
        if slicer is not None:
            self._slice(slicer, data, when)
            return
        bandwidth = _live(plan.bandwidth)
        if bandwidth is not None and (self._queue or self._tokens < len(data)):
            bandwidth.stats.fault_bytes_delayed_total += len(data)
        self._push(when, data)

    def _limit(self, limit: LiveFault, data: bytes) -> bytes:
        """Cut ``data`` at the limit; the connection ends once it is reached."""
        left = limit.spec.bytes - self.forwarded
        if len(data) < left:
            return data
        kept = data[: max(left, 0)]
        limit.stats.fault_bytes_discarded_total += len(data) - len(kept)
        if not self._limited:
            self._limited = True
            self.loop.call_soon(self.cut, limit, "fault_limit_data")
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
        if self.mirror is not None:
            self.mirror.copy_eof()
        if self._closing or self._eof:
            return
        self._eof = True
        if _live(self.plan.timeout) is None:  # a timeout swallows the FIN too
            self._push(self._closing_time(), _EOF)

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        """Close once everything held has left (and a slow_close has waited)."""
        if self._closing:
            return
        self._closing = True
        when = self._closing_time()
        if not self._queue and when <= self.loop.time():
            self.real.close()
            return
        self.lingering.add(self)
        self._push(when, _CLOSE)

    def abort(self) -> None:
        self._closing = True
        self._drop()
        self.real.abort()

    def _closing_time(self) -> float:
        slow = _live(self.plan.slow_close)
        when = self.loop.time() + (slow.spec.delay if slow is not None else 0.0)
        return max(when, self.last_release)

    # -- the queue ------------------------------------------------------------------------------

    def _push(self, when: float, item: object) -> None:
        queue = self._queue
        queue.append([when, item])
        if isinstance(item, bytes):
            self.queued += len(item)
        self.last_release = when
        if self._timer is None and len(queue) == 1:
            if when <= self.loop.time():
                self._release()
            else:
                self._timer = self.loop.call_at(when, self._release)
        if self.queued > HIGH_WATER and not self._holding:
            self._holding = True
            self.peer.hold()

    def _release(self) -> None:
        """Send what is due, as the bandwidth allows; wake again when the next piece is."""
        self._timer = None
        real = self.real
        if real.is_closing():
            self._drop()
            return
        queue = self._queue
        now = self.loop.time()
        while queue:
            head = queue[0]
            when, item = head
            if when > now:
                self._timer = self.loop.call_at(when, self._release)
                break
            if item is _EOF:
                queue.popleft()
                real.write_eof()
                continue
            if item is _CLOSE:
                queue.popleft()
                self.lingering.discard(self)
                real.close()
                return
            allowed, wait = self._allowance(len(item), now)
            if allowed:
                real.write(item[:allowed] if allowed < len(item) else item)
                self.queued -= allowed
            if allowed < len(item):
                head[1] = item[allowed:]
                self._timer = self.loop.call_at(now + wait, self._release)
                break
            queue.popleft()
        if self._holding and self.queued <= LOW_WATER:
            self._holding = False
            self.peer.unhold()

    def _allowance(self, want: int, now: float) -> tuple[int, float]:
        """How many of ``want`` bytes may leave now, and else how long until more may."""
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

    def _drop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()
        self.queued = 0
        self.lingering.discard(self)

    # -- reading: back-pressure from two places -------------------------------------------------

    def pause_reading(self) -> None:
        self._paused = True
        if not self.real.is_closing():
            self.real.pause_reading()

    def resume_reading(self) -> None:
        self._paused = False
        if not self._held and not self.real.is_closing():
            self.real.resume_reading()

    def hold(self) -> None:
        """The peer holds too many of the bytes read here: stop reading until ``unhold``."""
        self._held = True
        if not self.real.is_closing():
            self.real.pause_reading()

    def unhold(self) -> None:
        self._held = False
        if not self._paused and not self.real.is_closing():
            self.real.resume_reading()

    # -- the rest of a transport ----------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing or self.real.is_closing()

    def get_extra_info(self, name: str, default: object = None) -> Any:
        return self.real.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        # Never 0: splice would take this direction's bytes past its faults (module docstring).
        return self.real.get_write_buffer_size() + self.queued + 1


def _burst(rate: int) -> float:
    return float(max(1, min(int(rate * BURST_SECONDS), MAX_BURST)))
