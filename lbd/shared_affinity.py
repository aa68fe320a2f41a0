"""ClientIP session affinity that holds across worker processes.

With several workers a client's connections are accepted by whichever worker wakes first, so a
per-process table (``lbd.affinity``) would send one client to several endpoints. Here every
worker also publishes its affinity entries in a row of the shared memory region the supervisor
creates (``lbd.shared.SharedCounts``), and a lookup reads every worker's row: the client gets
the endpoint of the *oldest* live entry among them, so two workers that picked differently for
the same new client in the same instant converge on the first pick at the next connection.

Each row has a single writer (its worker), so no locks: an entry is written under a sequence
number (odd while being written, as a seqlock), and a reader that sees an odd or changed number
retries or skips it. Entries are found by open addressing on a CRC of (service port, client);
an entry names its endpoint by the endpoint's shared slot (``lbd.shared.SlotAllocator``), which
means the same endpoint in every worker. Entries expire by time; nothing sweeps them.
"""

from __future__ import annotations

import socket
import struct
import time
import zlib
from collections.abc import Collection
from typing import TYPE_CHECKING

from lbd.affinity import AffinityTable

if TYPE_CHECKING:
    from lbd.config.routes import RouteKey
    from lbd.pool import Pool, UpstreamEndpoint

ENTRIES = 32768  # per worker: 1.5 MiB of address space, pages touched only when used
PROBES = 4  # open addressing: an entry lives in one of this many cells after its hash
# seq, route hash, client (16 bytes, IPv4 mapped), endpoint slot, pad, first pick, last use
_ENTRY = struct.Struct("<II16sIIdd")
ENTRY_SIZE = _ENTRY.size  # 48
_SEQ = struct.Struct("<I")
_V4_PREFIX = b"\0" * 10 + b"\xff\xff"


def client_key(client: str) -> bytes:
    """16 bytes for an IP address (IPv4 mapped into IPv6); b"" for anything else."""
    try:
        if ":" in client:
            return socket.inet_pton(socket.AF_INET6, client)
        return _V4_PREFIX + socket.inet_pton(socket.AF_INET, client)
    except OSError:
        return b""


def route_hash(key: RouteKey) -> int:
    return zlib.crc32(repr(key).encode())


class AffinityRows:
    """The affinity part of the shared region: one row of ``ENTRIES`` cells per worker."""

    __slots__ = ("_view", "worker", "workers")

    def __init__(self, view: memoryview, workers: int, worker: int) -> None:
        self._view = view
        self.workers = workers
        self.worker = worker  # the row this process writes; -1: read only

    def release(self) -> None:
        self._view.release()

    @staticmethod
    def size(workers: int) -> int:
        return workers * ENTRIES * ENTRY_SIZE

    def find(
        self, route: int, client: bytes, now: float, timeout: float
    ) -> list[tuple[float, int]]:
        """(first pick, endpoint slot) of every worker's live entry for this client."""
        found = []
        start = zlib.crc32(client, route) % ENTRIES
        for row in range(self.workers):
            for probe in range(PROBES):
                entry = self._read(row, (start + probe) % ENTRIES)
                if entry is not None and entry[1] == route and entry[2] == client:
                    if now - entry[6] <= timeout:
                        found.append((entry[5], entry[3]))
                    break
        return found

    def write(self, route: int, client: bytes, slot: int, now: float, timeout: float) -> bool:
        """Publish this worker's entry; False when every cell it may use holds another live
        client (the entry then stays local to this worker)."""
        start = zlib.crc32(client, route) % ENTRIES
        row = self.worker
        victim = -1
        for probe in range(PROBES):
            cell = (start + probe) % ENTRIES
            entry = self._read(row, cell)
            if entry is None or now - entry[6] > timeout or entry[0] == 0:
                if victim < 0:
                    victim = cell
                continue
            if entry[1] == route and entry[2] == client:
                first = entry[5] if entry[3] == slot else now
                self._store(row, cell, route, client, slot, first, now)
                return True
        if victim < 0:
            return False
        self._store(row, victim, route, client, slot, now, now)
        return True

    def clear(self, route: int, client: bytes) -> None:
        start = zlib.crc32(client, route) % ENTRIES
        for probe in range(PROBES):
            cell = (start + probe) % ENTRIES
            entry = self._read(self.worker, cell)
            if entry is not None and entry[1] == route and entry[2] == client:
                self._store(self.worker, cell, 0, b"", 0, 0.0, 0.0)
                return

    def _read(self, row: int, cell: int) -> tuple[int, int, bytes, int, int, float, float] | None:
        """The entry, or None while its writer is in the middle of changing it (seqlock: the
        sequence number before and after the copy must be the same even number)."""
        offset = (row * ENTRIES + cell) * ENTRY_SIZE
        view = self._view
        for _ in range(3):
            before = _SEQ.unpack_from(view, offset)[0]
            if before & 1:
                continue
            entry = _ENTRY.unpack_from(view, offset)
            if _SEQ.unpack_from(view, offset)[0] == before == entry[0]:
                return entry
        return None

    def _store(
        self, row: int, cell: int, route: int, client: bytes, slot: int, first: float, last: float
    ) -> None:
        offset = (row * ENTRIES + cell) * ENTRY_SIZE
        view = self._view
        seq = _SEQ.unpack_from(view, offset)[0]
        _SEQ.pack_into(view, offset, (seq + 1) | 1)  # odd: being written
        _ENTRY.pack_into(view, offset, (seq + 1) | 1, route, client, slot, 0, first, last)
        _SEQ.pack_into(view, offset, ((seq + 1) | 1) + 1)


class SharedAffinityTable(AffinityTable):
    """A route's affinity with several workers: the local table plus the shared rows."""

    __slots__ = ("_pool", "_route", "_rows")

    def __init__(self, timeout: float, rows: AffinityRows, pool: Pool) -> None:
        super().__init__(timeout)
        self._rows = rows
        self._route = route_hash(pool.route_key)
        self._pool = pool  # maps a slot back to this worker's endpoint object

    def lookup(
        self,
        client: str,
        now: float,
        eligible: Collection[UpstreamEndpoint] | None = None,
    ) -> UpstreamEndpoint | None:
        key = client_key(client)
        if not key:
            return super().lookup(client, now, eligible)
        found = sorted(self._rows.find(self._route, key, time.monotonic(), self.timeout))
        for _first, slot in found:
            for endpoint in self._pool.members:
                if endpoint.slot == slot and (eligible is None or endpoint in eligible):
                    return endpoint
        return None

    def record(self, client: str, endpoint: UpstreamEndpoint, now: float) -> None:
        super().record(client, endpoint, now)
        key = client_key(client)
        if (
            key
            and endpoint.slot >= 0
            and not self._rows.write(
                self._route, key, endpoint.slot, time.monotonic(), self.timeout
            )
        ):
            self.overflow += 1

    def forget(self, keep: Collection[UpstreamEndpoint]) -> list[str]:
        gone = super().forget(keep)
        for client in gone:
            key = client_key(client)
            if key:
                self._rows.clear(self._route, key)
        return gone
