"""ClientIP session affinity that holds across worker processes.

With several workers a client's connections are accepted by whichever worker wakes first, so a
per-process table (``lbd.endpoints.affinity``) would send one client to several endpoints. Here
every
worker also publishes its affinity entries in a row of the shared memory region the supervisor
creates (``lbd.shm.counts.SharedCounts``), and a lookup reads every worker's row: the client gets
the endpoint of the *oldest* live entry among them, so two workers that picked differently for
the same new client in the same instant converge on the first pick at the next connection.

Each row has a single writer (its worker), so no locks: an entry is written under a sequence
number (odd while being written, as a seqlock), and a reader that sees an odd or changed number
retries or skips it. Entries are found by open addressing on a CRC of (service port, client);
an entry names its endpoint by the endpoint's shared slot (``lbd.shm.counts.SlotAllocator``), which
means the same endpoint in every worker. Entries expire by time; nothing sweeps them.
"""

from __future__ import annotations

import socket
import struct
import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lbd.config.routes import RouteKey

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
