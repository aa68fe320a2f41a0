"""Active-connection counts that stay global across worker processes.

One shared memory region (a memfd the supervisor creates and every worker maps) holds a row of
64-bit counters per worker, one column per endpoint slot. A worker writes only its own row, and
only through ``Pool.acquire``/``Pool.release``; readers (least-connection, ``/services``) sum
the column. One writer per cell means no locks: an aligned 8-byte store is atomic on the CPUs
lbd runs on, so a reader sees each cell either before or after an update, and the sum is at most
a few connections stale, as any lock-free load balancer's is.

The supervisor owns the slot numbers (``SlotAllocator``): every worker gets the same table with
its config, so a slot means the same endpoint in every process, and an endpoint keeps its slot
while any worker still counts connections on it (drained endpoints are freed only at zero). A
dead worker's row is zeroed before its replacement starts, since nobody is left to decrement it.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterable

from lbd.config.model import Config
from lbd.config.routes import RouteKey, route_specs
from lbd.shm.affinity_rows import AffinityRows

SlotKey = tuple[RouteKey, str, int]  # (route, endpoint address, endpoint port)
DEFAULT_SLOTS = 65536  # per worker: 512 KiB of address space, pages touched only when used
CELL = 8


class SharedCounts:
    """The counters region, mapped in this process."""

    __slots__ = ("_map", "affinity", "fd", "slots", "values", "worker", "workers")

    def __init__(self, fd: int, workers: int, slots: int, worker: int = -1) -> None:
        self.fd = fd
        self.workers = workers
        self.slots = slots
        self.worker = worker  # the row this process writes; -1 in the supervisor (reads only)
        counts_size = workers * slots * CELL
        self._map = mmap.mmap(fd, counts_size + AffinityRows.size(workers))
        whole = memoryview(self._map)
        self.values = whole[:counts_size].cast("q")
        # After the counters: the workers' ClientIP affinity entries (lbd.shm.affinity_rows).
        self.affinity = AffinityRows(whole[counts_size:], workers, worker)
        whole.release()

    @classmethod
    def create(cls, workers: int, slots: int = DEFAULT_SLOTS) -> SharedCounts:
        fd = os.memfd_create("lbd-active", os.MFD_CLOEXEC)
        os.ftruncate(fd, workers * slots * CELL + AffinityRows.size(workers))
        return cls(fd, workers, slots)

    def add(self, slot: int, delta: int) -> None:
        index = self.worker * self.slots + slot
        self.values[index] += delta

    def total(self, slot: int) -> int:
        values, slots = self.values, self.slots
        return sum(values[row * slots + slot] for row in range(self.workers))

    def clear_row(self, worker: int) -> None:
        start = worker * self.slots
        self.values[start : start + self.slots] = memoryview(bytes(self.slots * CELL)).cast("q")

    def close(self) -> None:
        self.values.release()
        self.affinity.release()
        self._map.close()
        os.close(self.fd)


# An outlier ejection to tell the other workers about: (route, address, port, seconds).
EjectionAnnouncer = Callable[[RouteKey, str, int, float], None]


class EndpointSlots:
    """A worker's view: the supervisor's slot table and this worker's row of counters, and
    where this worker's outlier ejections go so that every worker ejects the endpoint."""

    __slots__ = ("announce_ejection", "counts", "table")

    def __init__(self, counts: SharedCounts, table: dict[SlotKey, int]) -> None:
        self.counts = counts
        self.table = table
        self.announce_ejection: EjectionAnnouncer | None = None

    def slot_of(self, route: RouteKey, address: str, port: int) -> int:
        """The endpoint's slot, or -1 (the slots ran out: it is counted in this worker only)."""
        return self.table.get((route, address, port), -1)

    def admission_slot(self, route: RouteKey) -> int:
        """The slot counting the route's admitted connections (maxConnections), or -1."""
        return self.table.get(admission_key(route), -1)


def admission_key(route: RouteKey) -> SlotKey:
    """A service port's own slot: no endpoint has an empty address."""
    return (route, "", 0)


class SlotAllocator:
    """The supervisor's table: stable slots for the endpoints of every config it applied."""

    def __init__(self, slots: int) -> None:
        self.table: dict[SlotKey, int] = {}
        self._free = list(range(slots - 1, -1, -1))
        self.exhausted = 0  # endpoints (or ports) left without a slot: counted per worker only

    def assign(self, config: Config, totals: SharedCounts | None = None) -> dict[SlotKey, int]:
        """Slots for every endpoint of ``config``. Endpoints of earlier configs keep theirs
        while ``totals`` still counts connections on them (they are draining somewhere)."""
        wanted = set(_endpoint_keys(config))
        for key in [key for key in self.table if key not in wanted]:
            if totals is None or totals.total(self.table[key]) == 0:
                self._free.append(self.table.pop(key))
        self.exhausted = 0
        for key in wanted:
            if key not in self.table:
                if not self._free:
                    self.exhausted += 1
                    continue
                self.table[key] = self._free.pop()
        return dict(self.table)


def _endpoint_keys(config: Config) -> Iterable[SlotKey]:
    for key, spec in route_specs(config).items():
        yield admission_key(key)
        for address, port, *_rest in spec.targets:
            yield (key, address, port)
