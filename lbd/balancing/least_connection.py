"""``least-connection``: fewest active connections relative to weight, ties broken randomly.

Compares ``active / weight`` by cross-multiplying (no floats), and breaks ties by reservoir
sampling so that equal endpoints share load evenly instead of the first one taking it all.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from lbd.balancing.base import C


class LeastConnectionBalancer:
    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, eligible: Sequence[C], client: str, exclude: Collection[C] = ()) -> C | None:
        best: C | None = None
        ties = 0
        for candidate in eligible:
            if exclude and candidate in exclude:
                continue
            if best is None:
                best, ties = candidate, 1
                continue
            # candidate.active / candidate.weight vs best.active / best.weight
            left = candidate.active * best.weight
            right = best.active * candidate.weight
            if left < right:
                best, ties = candidate, 1
            elif left == right:
                ties += 1
                if self._rng.randrange(ties) == 0:
                    best = candidate
        return best
