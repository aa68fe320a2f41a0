"""Medians, spread and the ratios the report is about."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    n: int
    failures: int
    median: float | None
    low: float | None  # min
    high: float | None  # max
    q1: float | None
    q3: float | None

    @property
    def spread_pct(self) -> float | None:
        """(max - min) / median, in percent: how noisy this cell was."""
        if self.median is None or self.low is None or self.high is None or not self.median:
            return None
        return (self.high - self.low) / abs(self.median) * 100


def summarize(values: list[float], failures: int) -> Summary:
    if not values:
        return Summary(0, failures, None, None, None, None, None)
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return Summary(
        len(ordered), failures, statistics.median(ordered), ordered[0], ordered[-1], q1, q3
    )


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def best(candidates: dict[str, float | None], higher_is_better: bool) -> tuple[str, float] | None:
    """The best median among reference targets (max for throughput, min for latency/memory)."""
    present = {key: value for key, value in candidates.items() if value is not None}
    if not present:
        return None
    pick = max if higher_is_better else min
    key = pick(present, key=lambda k: present[k])
    return key, present[key]
