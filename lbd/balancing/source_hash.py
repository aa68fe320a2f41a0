"""``source-hash``: a plain hash of the client key modulo the eligible endpoints.

Like ``maglev`` it needs no shared state: every node orders the endpoints by name and hashes the
client the same way (``lbd.balancing.hashing``), so a client goes to the same endpoint through
any node. Unlike Maglev, a change of the set moves most clients: with N endpoints, removing one
moves about (N - 1)/N of them, since the modulus changed under every client (HAProxy's
``balance source`` with its default map-based hash behaves the same). It is here for comparison
and for small sets that rarely change.

With equal weights a client goes to ``members[h mod N]``; with weights, h is scaled onto the
cumulative weights in name order, which is the same rule. A retry takes the next endpoint in
name order that it has not tried.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Collection, Sequence

from lbd.balancing.base import C
from lbd.balancing.hashing import CanonicalSets, SetKey, stable_hash

HASH_RANGE = 1 << 64


def cumulative_weights(key: SetKey) -> list[float] | None:
    """Running totals of the weights in name order; None when the weights are all equal."""
    weights = [weight for _, weight in key]
    if all(weight == weights[0] for weight in weights):
        return None
    return list(itertools.accumulate(weights))


class SourceHashBalancer:
    __slots__ = ("_sets",)

    def __init__(self, rng: random.Random | None = None) -> None:
        # rng: unused (the choice depends on nothing random), taken as every strategy's is.
        self._sets: CanonicalSets[list[float] | None] = CanonicalSets(cumulative_weights)

    def pick(self, eligible: Sequence[C], client: str, exclude: Collection[C] = ()) -> C | None:
        count = len(eligible)
        if count <= 1:
            if eligible and eligible[0] not in exclude:
                return eligible[0]
            return None
        totals, members = self._sets.lookup(eligible)
        hashed = stable_hash(client)
        if totals is None:
            index = hashed % count
        else:
            point = hashed / HASH_RANGE * totals[-1]
            index = min(bisect.bisect_right(totals, point), count - 1)
        for step in range(count):
            candidate = members[(index + step) % count]
            if not exclude or candidate not in exclude:
                return candidate
        return None
