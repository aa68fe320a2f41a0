"""``maglev``: Google's Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4).

Every lbd node builds the same lookup table from the same eligible endpoints, sharing no state
with the others, so a client lands on the same endpoint through whichever node a router's ECMP
hash sends it to; and removing one of N endpoints moves about 1/N of the clients (those that
were on it, and a few more), where a plain hash modulo N moves most of them.

The table has M slots, M a prime (65,537 by default; the paper asks for M much larger than the
number of endpoints, which keeps each endpoint's share within about 1 % of its due). Endpoint i,
named ``address:port``, prefers the slots in the order

    permutation[i][j] = (offset + j * skip) mod M,
    offset = h1(name) mod M,   skip = h2(name) mod (M - 1) + 1,

which visits every slot once because M is prime. The endpoints take turns, in the order of their
names; at its turn an endpoint claims its most preferred slot that is still free, until every
slot is taken (the paper's Algorithm 1, ``populate`` below). A client with key k (its address,
or address and port) goes to ``table[h(k) mod M]``.

Weights: the paper's loop gives every endpoint one turn per round. Here an endpoint earns its
weight in credit each round and takes a turn when its credit reaches the largest weight, paying
that much: an endpoint of the largest weight turns every round, one of half that weight every
other round, so endpoints claim slots in proportion to their weights, and with equal weights the
loop is exactly the paper's. Fractional weights (slow start) are snapped to a grid first
(``lbd.balancing.hashing.set_weight``), so a ramp rebuilds the table some 50 times, not per
connection.

A retry (``exclude`` holds the endpoints a connection already tried) walks on along the table
from the client's slot to the first endpoint not yet tried: deterministic, so every node retries
a client alike, and weighted, since heavier endpoints hold more slots.

h1, h2 and h are BLAKE2b (``lbd.balancing.hashing``), the same on every node. Building the table
for 1,000 endpoints and 65,537 slots takes tens of milliseconds (benchmarks/maglev_table.py); it
is built once per distinct eligible set and reused.
"""

from __future__ import annotations

import hashlib
import random
from array import array
from collections.abc import Collection, Sequence

from lbd.balancing.base import C
from lbd.balancing.hashing import CanonicalSets, SetKey, stable_hash

DEFAULT_TABLE_SIZE = 65537
# Fractional weights become whole turn rates relative to the heaviest endpoint, this fine.
RATE_SCALE = 1 << 20

Preference = tuple[int, int]  # (offset, skip): an endpoint's permutation of the slots


def is_prime(number: int) -> bool:
    if number < 2:
        return False
    divisor = 2
    while divisor * divisor <= number:
        if number % divisor == 0:
            return False
        divisor += 1
    return True


def preference(name: str, size: int) -> Preference:
    """(offset, skip) of the endpoint called ``name`` in a table of ``size`` slots."""
    digest = hashlib.blake2b(name.encode(), digest_size=16).digest()
    h1, h2 = int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:], "big")
    return h1 % size, h2 % (size - 1) + 1


def turn_rates(weights: Sequence[float]) -> list[int]:
    """Whole numbers in the ratio of ``weights``: exact for whole weights."""
    if all(weight == int(weight) for weight in weights):
        return [int(weight) for weight in weights]
    heaviest = max(weights)
    return [max(1, round(w / heaviest * RATE_SCALE)) if w > 0 else 0 for w in weights]


def populate(preferences: Sequence[Preference], rates: Sequence[int], size: int) -> list[int]:
    """The paper's Algorithm 1 with weighted turns: ``table[slot]`` is an index into
    ``preferences``. Every slot is filled; an endpoint whose rate is 0 gets none."""
    count = len(preferences)
    table = [-1] * size
    if count == 0:
        return table
    # next[i] of the paper is kept as the slot it points at: permutation[i][next[i]].
    wanted = [offset for offset, _ in preferences]
    skips = [skip for _, skip in preferences]
    heaviest = max(rates)
    if heaviest <= 0:
        return table
    credit = [0] * count
    filled = 0
    while True:
        for i in range(count):
            rate = rates[i]
            if rate != heaviest:
                credit[i] += rate
                if credit[i] < heaviest:
                    continue
                credit[i] -= heaviest
            slot, skip = wanted[i], skips[i]
            while table[slot] >= 0:
                slot += skip
                if slot >= size:
                    slot -= size
            table[slot] = i
            slot += skip
            wanted[i] = slot - size if slot >= size else slot
            filled += 1
            if filled == size:
                return table


def build_table(key: SetKey, size: int) -> array[int]:
    """The lookup table of the endpoint set ``key`` ((name, weight), sorted by name)."""
    preferences = [preference(name, size) for name, _ in key]
    table = populate(preferences, turn_rates([weight for _, weight in key]), size)
    return array("H" if len(key) <= 0xFFFF else "L", table)


class MaglevBalancer:
    __slots__ = ("_sets", "table_size")

    def __init__(self, rng: random.Random | None = None, table_size: int = DEFAULT_TABLE_SIZE):
        # rng: unused (the choice depends on nothing random), taken as every strategy's is.
        if not is_prime(table_size):
            raise ValueError(f"the Maglev table size must be a prime, got {table_size}")
        self.table_size = table_size
        self._sets: CanonicalSets[array[int]] = CanonicalSets(self._build)

    def _build(self, key: SetKey) -> array[int]:
        return build_table(key, self.table_size)

    def pick(self, eligible: Sequence[C], client: str, exclude: Collection[C] = ()) -> C | None:
        if len(eligible) <= 1:
            if eligible and eligible[0] not in exclude:
                return eligible[0]
            return None
        table, members = self._sets.lookup(eligible)
        slot = stable_hash(client) % self.table_size
        chosen = members[table[slot]]
        if not exclude or chosen not in exclude:
            return chosen
        return walk(table, members, slot, exclude)


def walk(table: Sequence[int], members: Sequence[C], slot: int, exclude: Collection[C]) -> C | None:
    """The first endpoint after ``slot`` along ``table`` that is not in ``exclude``."""
    left = [member for member in members if member not in exclude]
    if len(left) <= 1:
        return left[0] if left else None
    size = len(table)
    for step in range(1, size):
        candidate = members[table[(slot + step) % size]]
        if candidate not in exclude:
            return candidate
    return left[0]  # what is left holds no slot (a weight too small for the table)
