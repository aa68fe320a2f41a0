"""``random``: weighted random choice (HAProxy's ``balance random`` with one draw)."""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from lbd.balancing.base import C, all_equal_weight, remaining


class RandomBalancer:
    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, eligible: Sequence[C], client: str, exclude: Collection[C] = ()) -> C | None:
        candidates = remaining(eligible, exclude)
        if not candidates:
            return None
        if len(candidates) == 1 or all_equal_weight(candidates):
            return candidates[self._rng.randrange(len(candidates))]
        return self._rng.choices(candidates, weights=[c.weight for c in candidates])[0]
